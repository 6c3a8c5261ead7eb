"""Grammar-constrained JSON (llguidance) as a logit processor of our own Engine: 0% malformed output."""

from __future__ import annotations

import json

import pytest
import torch

from memory.blocks import EDIT_SCHEMA, ModelBlockEditor
from memory.grammar import JsonConstraint
from tests.memory.strategy_helpers import msg, smollm2_counter


@pytest.fixture(scope="module")
def tok():
    return smollm2_counter()


@pytest.fixture(scope="module")
def engine(tok):
    """The real Engine over a 2-layer random-weight Llama with SmolLM2's tokenizer."""
    from model import Engine
    from model.config import ModelArgs
    from model.llama import Transformer
    from model.registry import LoadedModel

    torch.manual_seed(0)
    args = ModelArgs(family="llama", vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=128, tie_embeddings=True, context_length=1024, max_seq_len=1024)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.05)
    model.tie_weights()
    model.eval().requires_grad_(False)
    lm = LoadedModel(name="tiny", args=args, model=model, tokenizer=tok, context_window=1024,
                     device=torch.device("cpu"), dtype=torch.float32, path=None)
    return Engine(lm)


def _valid_edits(value) -> bool:
    assert set(value) == {"edits"} and len(value["edits"]) <= 3
    for e in value["edits"]:
        assert e["label"] in ("user", "relationship") and e["op"] in ("append", "replace")
        assert set(e) <= {"label", "op", "old", "text"} and 1 <= len(e["text"]) <= 200
    return True


@pytest.mark.parametrize("seed", range(8))
def test_random_logits_always_give_schema_valid_json(tok, seed):
    constraint = JsonConstraint(tok, EDIT_SCHEMA)
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(600):
        logits = constraint(ids, torch.randn(tok.vocab_size, generator=g) * 5)
        nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if nxt in tok.eos_ids:
            break
        ids.append(nxt)
    else:
        pytest.fail("the grammar never allowed end of sequence")
    assert _valid_edits(json.loads(tok.decode(ids)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_with_the_constraint_writes_well_formed_json(tok, engine, temperature):
    from model import SamplingParams

    ids = tok.apply_chat_template([{"role": "user", "content": "Give me JSON."}])
    for seed in range(3):
        constraint = JsonConstraint(tok, EDIT_SCHEMA)
        params = SamplingParams(max_tokens=400, temperature=temperature, seed=seed)
        out = engine.complete(ids, params, logits_processors=[constraint])
        assert out.finish_reason == "stop", out.text  # the grammar closed the JSON before max_tokens
        assert _valid_edits(json.loads(out.text))


def test_block_editor_returns_edit_dicts_through_the_engine(tok, engine):
    editor = ModelBlockEditor(engine, tok, max_tokens=400)
    edits = editor({"user": "My name is Ada."}, [msg(1, "user", "I live in Busan."), msg(2, "assistant", "Nice!")])
    assert isinstance(edits, list) and all(isinstance(e, dict) and "label" in e for e in edits)


def test_a_schema_llguidance_rejects_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="schema"):
        JsonConstraint(tok, {"type": "object", "properties": {"x": {"type": "no-such-type"}}})
