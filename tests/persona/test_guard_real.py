"""Real-model smoke test: Gemma 3 270M generating Korean with the guard on never closes a sentence
in 존댓말. Slow (loads real weights), so marked `slow`."""

from __future__ import annotations

import os

import pytest

from persona import PersonaRegistry
from persona.guard import RegisterGuard, check_reply
from persona.prompt import build_prompt_parts, post_history_note

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry = pytest.importorskip("model.registry")
    try:
        return registry.load_model("gemma-3-270m", device="cpu", progress=False)
    except registry.ModelLoadError as e:  # chunk packages missing
        pytest.skip(str(e))


def test_gemma_with_guard_has_no_polite_endings(gemma):
    from model import Engine, SamplingParams

    persona = PersonaRegistry().get("daughter-ko")
    parts = build_prompt_parts(persona)
    engine = Engine(gemma)
    guard = RegisterGuard(gemma.tokenizer, "banmal")
    # a polite opener invites 존댓말; several seeds so the guard has something to do
    for seed, line in enumerate(
        ["안녕하세요, 오늘 어떻게 지내셨어요?", "지우야, 요즘 뭐 하고 지내니? 요리는 좀 해?"]
    ):
        messages = parts.pinned + [{"role": "user", "content": line + post_history_note(parts.post_history)}]
        prompt = gemma.tokenizer.apply_chat_template(messages)
        params = SamplingParams(max_tokens=48, temperature=0.8, seed=seed)
        text = "".join(ev.text for ev in engine.generate(prompt, params, logits_processors=[guard]))
        assert text.strip(), "empty reply"
        assert check_reply(text, "banmal") == [], text
