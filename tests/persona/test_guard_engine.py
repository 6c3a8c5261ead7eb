"""The guard and the repair helper inside the real Engine, on a tiny random-weight Llama with a
byte-level tokenizer (each Hangul syllable is 3 tokens, like SmolLM2)."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import pytest
import torch

from persona.guard import RegisterGuard, engine_sentence_fn, repair_reply
from persona.korean import classify_reply


@pytest.fixture(scope="module")
def tiny():
    from model.config import ModelArgs
    from model.engine import Engine
    from model.llama import Transformer
    from model.registry import LoadedModel
    from model.tokenizer import Tokenizer

    path = Path(tempfile.mkdtemp(prefix="persona-bytes-")) / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = Tokenizer.from_tiktoken(path, special_tokens={"<|begin_of_text|>": 256, "<|eot_id|>": 257})
    args = ModelArgs(
        family="llama",
        vocab_size=tok.vocab_size,
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=48,
        norm_eps=1e-6,
        context_length=256,
        max_seq_len=256,
    )
    torch.manual_seed(0)
    lm = LoadedModel(
        "tiny",
        args,
        Transformer(args).eval().requires_grad_(False),
        tok,
        256,
        torch.device("cpu"),
        torch.float32,
        None,
    )
    return Engine(lm), tok


def forcing(tok, text: str, strength: float = 20.0):
    """A logits processor that makes the model spell `text` (then end), whatever its weights say,
    unless a later processor pushes a byte down harder."""
    target = tok.encode(text) + [257]

    def push(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros_like(logits)
        i = len(generated)
        want = target[i] if i < len(target) else 257
        if generated[:i] != target[:i]:  # diverged (the guard struck): a 반말 close
            want = tok.encode(".")[0] if not generated or generated[-1] != tok.encode(".")[0] else 257
        logits[want] = strength
        return logits

    return push


def run(engine, tok, processors, max_tokens=40) -> str:
    from model.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return "".join(ev.text for ev in engine.generate([1, 2, 3], params, logits_processors=processors))


def test_guard_in_engine_stops_polite_close(tiny):
    engine, tok = tiny
    assert run(engine, tok, [forcing(tok, "밥 먹었어요.")]) == "밥 먹었어요."
    guarded = run(engine, tok, [forcing(tok, "밥 먹었어요."), RegisterGuard(tok, "banmal")])
    assert guarded.startswith("밥 먹었어") and classify_reply(guarded) != "polite", guarded
    assert run(engine, tok, [forcing(tok, "꼭 필요해."), RegisterGuard(tok, "banmal")]) == "꼭 필요해."


def test_engine_sentence_fn_feeds_repair(tiny):
    from model.sampling import SamplingParams

    engine, tok = tiny
    fn = engine_sentence_fn(
        engine,
        [1, 2, 3],
        tok,
        SamplingParams(temperature=0.0, max_tokens=40),
        processors=[forcing(tok, "아빠는 뭐 먹었어? 또 먹자")],
    )
    assert fn("응.") == "아빠는 뭐 먹었어?"  # one sentence, cut at its end
    res = repair_reply(fn, "응. 아빠는 뭐 먹었어요?", "banmal")
    assert res.text == "응. 아빠는 뭐 먹었어?" and res.metadata == {
        "register": "banmal",
        "register_repairs": 1,
    }
