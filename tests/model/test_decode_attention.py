"""model/decode_attention.c: decode rows' attention read in place from the paged pool. Against torch's
padded gather + SDPA, a row's bits alone and in any batch, and the scheduler's use of it."""

from __future__ import annotations

import pytest
import torch

from model import ckernels, decode_attention
from model.decode_attention import attend, reference
from tests.model.test_engine import ids, tiny_lm
from tests.model.test_scheduler import alone, drain, new_seq, run_with_late_join

# where it can be built it must pass its self-check: a kernel that disagrees fails here, not skips
pytestmark = pytest.mark.skipif(not ckernels.buildable(), reason="no AVX2 + FMA + F16C, or no C compiler")


def case(B: int, H: int, n_kv: int, D: int, width: int, seed: int, slots: int = 400):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(slots, n_kv, D, generator=g), torch.randn(slots, n_kv, D, generator=g)
    q = torch.randn(B, H, D, generator=g) * 3  # peaked softmaxes as well as flat ones
    idx = torch.randint(0, slots, (B, width), generator=g)
    lens = torch.randint(1, width + 1, (B,), generator=g)
    lens[0] = width
    return q, k, v, idx, lens


def test_the_kernel_builds_and_passes_its_self_check():
    assert decode_attention.available()


@pytest.mark.parametrize("H, n_kv, D", [(9, 3, 64), (4, 1, 256), (8, 8, 16), (6, 2, 8)])
@pytest.mark.parametrize("width", [1, 3, 8, 37, 300])  # lengths off the kernel's 4- and 8-slot groups
def test_matches_torchs_gather_and_sdpa(H, n_kv, D, width):
    q, k, v, idx, lens = case(5, H, n_kv, D, width, seed=H + D + width)
    got, want = attend(q, k, v, idx, lens, D**-0.5), reference(q, k, v, idx, lens, D**-0.5)
    assert got.shape == (5, H, D) and (got - want).abs().max().item() <= 1e-5


def test_a_row_gives_the_same_bits_alone_and_in_any_batch():
    """Each row reads only its own slots, in order: another row's length or presence changes nothing."""
    q, k, v, idx, lens = case(8, 9, 3, 64, 120, seed=7)
    full = attend(q, k, v, idx, lens, 0.125)
    for b in range(8):
        n = int(lens[b])
        row = attend(q[b : b + 1], k, v, idx[b : b + 1, :n].contiguous(), lens[b : b + 1], 0.125)
        assert torch.equal(row, full[b : b + 1]), b
    assert torch.equal(attend(q[2:6], k, v, idx[2:6].contiguous(), lens[2:6], 0.125), full[2:6])


def test_extreme_scores_stay_finite_and_exact_where_one_slot_dominates():
    q, k, v, idx, lens = case(2, 4, 2, 32, 50, seed=3)
    q = q * 1000  # scores in the thousands: exp of (score - max) underflows to 0 for all but the max
    got, want = attend(q, k, v, idx, lens, 1.0), reference(q, k, v, idx, lens, 1.0)
    assert torch.isfinite(got).all() and (got - want).abs().max().item() <= 1e-5


def test_inputs_that_do_not_fit_are_named():
    q, k, v, idx, lens = case(2, 4, 2, 32, 10, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        attend(q[:, :3], k, v, idx, lens, 1.0)  # 3 query heads over 2 kv heads
    with pytest.raises(ValueError, match="do not fit"):
        attend(q, k, v, idx.int(), lens, 1.0)
    with pytest.raises(ValueError, match="contiguous float32"):
        attend(q, k.double(), v.double(), idx, lens, 1.0)


def test_torch_is_kept_when_asked(monkeypatch):
    monkeypatch.setenv("MEMENTO_ATTENTION_KERNEL", "torch")
    decode_attention.library.cache_clear()
    try:
        assert not decode_attention.available()
        monkeypatch.setenv("MEMENTO_ATTENTION_KERNEL", "sse9")
        decode_attention.library.cache_clear()
        with pytest.raises(ValueError, match="MEMENTO_ATTENTION_KERNEL"):
            decode_attention.library()
    finally:
        monkeypatch.undo()
        decode_attention.library.cache_clear()
    assert decode_attention.available()


def test_the_scheduler_decodes_through_it_and_rows_match_each_alone(monkeypatch):
    """Eager batched steps (the compiled single-row graph is off here) attend through the kernel,
    and 6 rows decoded together, one joining late, give each row's greedy tokens alone."""
    from model.engine import Engine

    calls = []
    real = decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    lm = tiny_lm()
    prompts = [ids(5 + 7 * i, 500 + i) for i in range(6)]
    want = [alone(lm, p, 8)[0] for p in prompts]
    assert calls == [1] * len(calls) and calls  # alone: one row a call, through the kernel too
    calls.clear()
    eng = Engine(lm, prefill_chunk=16)
    seqs = [new_seq(lm, p, 8) for p in prompts]
    run_with_late_join(eng.scheduler, seqs, early_steps=3)
    assert [drain(s)[0] for s in seqs] == want
    assert max(calls) == 5  # the five first rows decode in one call (the sixth joins as they end)
