"""model/fused_decode.py + model/decode_layer.c: decode rows of a q4dot-quantized Llama as one C call
per layer. Rows are the same bits alone or batched, the layer matches the block's torch forward,
a wrong layer is caught by the start-up check, and everything it does not cover stays on torch."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from model import ckernels, fused_decode
from model.engine import Engine
from model.fused_decode import FusedDecode
from model.paged_attention import PagedBatch, Row
from model.paged_cache import BlockPool
from model.qlinear import install_quantized, pack
from model.sampling import SamplingParams
from tests.model.conftest import ours_from_hf_dir
from tests.model.test_engine import Spy, ids, tiny_lm
from tests.model.test_q4dot import quantize_4bit, quantized_tiny_lm
from tests.model.test_scheduler import alone, drain, new_seq, run_with_late_join

pytestmark = pytest.mark.skipif(not ckernels.buildable(), reason="needs AVX2, FMA, F16C and a C compiler")


@pytest.fixture(scope="module")
def qlm():
    return quantized_tiny_lm("q4dot")


def quantized(model):
    """The model with every linear packed for q4dot (4-bit per group of 32, as GGUF's Q4_1)."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    install_quantized(model, {f"{n}.weight": pack(quantize_4bit(model.get_submodule(n).weight), "q4dot")
                              for n in names})
    return model


def filled_pool(lm, lengths, block_size=4):
    """A pool holding a random history of each length, and each row's block table (room for one more)."""
    pool = BlockPool.for_model(lm.model, 1 << 22, block_size)
    tables = []
    for i, n in enumerate(lengths):
        table = [pool.allocate() for _ in range(n // block_size + 1)]
        batch = PagedBatch(pool, [Row(table, 0, n, True)], lm.model.args)
        with torch.inference_mode():
            lm.model(torch.tensor([ids(n, 500 + i, vocab=lm.model.args.vocab_size)]), batch.positions, batch)
        tables.append(table)
    return pool, tables


def test_chosen_for_a_q4dot_llama_and_not_for_what_it_does_not_cover(qlm):
    eng = Engine(qlm)
    assert isinstance(eng.scheduler.decode, FusedDecode)
    assert not eng.pool.k_all[:, : eng.pool.block_size].any()  # the start-up check left the null block zero
    float_lm = tiny_lm()
    pool = BlockPool.for_model(float_lm.model, 1 << 20, 4)
    assert "layer 0: wqkv" in FusedDecode.why_not(float_lm.model, pool)
    assert FusedDecode.for_model(float_lm.model, pool) is None
    assert Engine(float_lm).scheduler.decode is None  # float32 weights: torch's path, as before
    assert Engine(qlm, fused_decode=False).scheduler.decode is None


def test_a_biased_projection_stays_on_torch(hf_dir_factory):
    _hf, path = hf_dir_factory("qwen2")  # q/k/v biases
    model = quantized(ours_from_hf_dir(path))
    assert "wqkv: QLinear (want an unbiased QLinear" in FusedDecode.why_not(model, BlockPool.for_model(model, 1 << 20, 4))


def test_rows_are_the_same_bits_alone_or_batched(qlm):
    lengths = [3, 17, 9, 30, 1, 22, 12, 5]
    pool, tables = filled_pool(qlm, lengths)
    step = FusedDecode.for_model(qlm.model, pool)
    tokens = ids(len(lengths), 77)
    together = step(tokens, tables, lengths)
    for i, n in enumerate(lengths):
        assert torch.equal(step([tokens[i]], [tables[i]], [n])[0], together[i]), f"row {i}"


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_matches_the_torch_forward(hf_dir_factory, kind):
    """Whole-model logits against the eager PagedBatch forward: float32 rounding, plus where an
    activation's int8 rounding turns over, one quantization step. Qwen3: q/k norms; Gemma 3:
    (1 + w) norms, post-norms, GeGLU, sliding layers (window 8, so the longer rows see only it)."""
    _hf, path = hf_dir_factory(kind)
    lm = SimpleNamespace(model=quantized(ours_from_hf_dir(path)))
    lengths = [6, 19, 11]
    pool, tables = filled_pool(lm, lengths)
    tokens = ids(3, 78, vocab=128)
    batch = PagedBatch(pool, [Row(t, n, 1, True) for t, n in zip(tables, lengths, strict=True)], lm.model.args)
    with torch.inference_mode():
        want = lm.model(torch.tensor([tokens]), batch.positions, batch)[0]
        k_torch = pool.k_all.clone()
    step = FusedDecode.for_model(lm.model, pool)
    assert step is not None
    got = step(tokens, tables, lengths)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(pool.k_all, k_torch, atol=1e-4)  # the new keys landed in the same slots


def test_the_start_up_check_rejects_a_layer_that_computes_something_else(qlm):
    pool = BlockPool.for_model(qlm.model, 1 << 20, 4)
    step = FusedDecode.for_model(qlm.model, pool)
    assert step.check()
    step.specs[1].scale *= 2  # attention scores twice too sharp in one layer
    assert not step.check()
    step.specs[1].scale /= 2
    step.specs[0].wo.bits = 8  # the 4-bit bytes read as int8
    assert not step.check()


def test_batched_with_late_join_and_cancel_gives_each_rows_tokens_alone(qlm):
    """Prompt chunks go through torch while the decode rows beside them stay in C (one path per row
    whatever else runs), so every row's tokens equal its tokens alone."""
    prompts = [ids(8 + 9 * i, 600 + i) for i in range(8)]
    want = [alone(qlm, p, 10) for p in prompts]
    eng = Engine(qlm, prefill_chunk=32)
    step = eng.scheduler.decode
    spies = [Spy() for _ in prompts]
    seqs = [new_seq(qlm, p, 10, spy=s) for p, s in zip(prompts, spies, strict=True)]

    cancel_after = 4

    class CancelRow3:
        def __call__(self, generated, logits):
            if len(generated) == cancel_after:
                seqs[3].cancel()
            return logits

    seqs[3].processors.append(CancelRow3())
    run_with_late_join(eng.scheduler, seqs, early_steps=4)
    for i, s in enumerate(seqs):
        toks, reason = drain(s)
        if i == 3:
            assert reason == "cancelled" and toks == want[i][0][: len(toks)]
            continue
        assert reason == "length" and toks == want[i][0], f"row {i}"
        worst = max((g - r).abs().max().item() for g, r in zip(spies[i].seen, want[i][1], strict=True))
        assert worst <= 0.1, (i, worst)
    assert step.failed is None and step.calls > 0


def test_a_failing_step_falls_back_to_torch_with_the_same_tokens(qlm, caplog, monkeypatch):
    prompt = ids(9, 31)
    want = Engine(qlm, fused_decode=False).complete(prompt, SamplingParams(temperature=0, max_tokens=6)).token_ids
    eng = Engine(qlm)
    step = eng.scheduler.decode

    def broken(*_args):
        raise MemoryError("decode_layer: no memory for a layer's scratch")

    monkeypatch.setattr(step, "_layer", broken)
    assert eng.complete(prompt, SamplingParams(temperature=0, max_tokens=6)).token_ids == want
    assert isinstance(step.failed, MemoryError) and "decoding eagerly from now on" in caplog.text
    eng.close()


def test_decode_kernel_torch_turns_it_off(qlm, monkeypatch):
    monkeypatch.setenv("MEMENTO_DECODE_KERNEL", "torch")
    fused_decode.library.cache_clear()
    try:
        assert Engine(qlm).scheduler.decode is None
        monkeypatch.setenv("MEMENTO_DECODE_KERNEL", "fast")
        fused_decode.library.cache_clear()
        with pytest.raises(ValueError, match="MEMENTO_DECODE_KERNEL='fast'"):
            Engine(qlm)
    finally:
        monkeypatch.undo()
        fused_decode.library.cache_clear()
    assert isinstance(fused_decode.library(), ctypes.CDLL)


def test_a_one_token_chunk_cut_short_by_the_prefill_budget_is_not_a_decode_row(qlm):
    """Budget 16: a 15-token prompt leaves one token of budget to the next prompt, whose one-token
    chunk samples nothing; it must run with the chunks, not as a decode row beside the runner."""
    prompts = [ids(12, 700), ids(15, 701), ids(30, 702)]
    want = [alone(qlm, p, 6)[0] for p in prompts]
    eng = Engine(qlm, prefill_chunk=16)
    fed = []

    class Recording:  # the scheduler's view of the fused step, recording how many rows it gets
        max_rows, takes_mixed_steps, failed = FusedDecode.max_rows, True, None

        def __call__(self, tokens, tables, positions):
            fed.append(len(tokens))
            return step(tokens, tables, positions)

    step, eng.scheduler.decode = eng.scheduler.decode, Recording()
    seqs = [new_seq(qlm, p, 6) for p in prompts]
    eng.scheduler.add(seqs[0])
    eng.scheduler.step()
    eng.scheduler.step()  # the runner decodes
    eng.scheduler.add(seqs[1])
    eng.scheduler.add(seqs[2])
    eng.scheduler.step()  # runner 1 token, 15 of the second prompt, 1 of the third
    assert seqs[2].computed == 1 and not seqs[2].generated
    assert fed == [1, 1]  # the runner alone, both times
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert [drain(s)[0] for s in seqs] == want
