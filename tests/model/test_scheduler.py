"""Continuous batching: rows decoded together give what each gives alone; joins, cancels,
preemption, chunked prefill and owner round-robin, driven step by step on tiny random models."""

from __future__ import annotations

import pytest
import torch

from model.engine import Engine
from model.sampling import SamplingParams
from model.sequence import Sequence
from tests.model.conftest import ours_from_hf_dir
from tests.model.test_engine import Spy, full_logits, ids, no_eos, tiny_lm

ATOL = 1e-4


def drain(seq: Sequence) -> tuple[list[int], str]:
    toks, reason = [], None
    while not seq.out.empty():
        kind, a, _lp, _top = seq.out.get()
        if kind == "token":
            toks.append(a)
        else:
            reason = a
    return toks, reason


def alone(lm, prompt, max_tokens):
    spy = Spy()
    out = Engine(lm).complete(prompt, SamplingParams(temperature=0, max_tokens=max_tokens),
                              logits_processors=[spy, no_eos(lm)])
    return out.token_ids, spy.seen


def run_with_late_join(sched, seqs, early_steps: int) -> None:
    """All but the last sequence start together; the last joins after `early_steps` steps."""
    for s in seqs[:-1]:
        sched.add(s)
    for _ in range(early_steps):
        sched.step()
    sched.add(seqs[-1])
    while sched.has_work():
        sched.step()


def new_seq(lm, prompt, max_tokens, owner="", spy=None):
    procs = [spy, no_eos(lm)] if spy is not None else [no_eos(lm)]
    return Sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), owner=owner, processors=procs)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_eight_rows_batched_equal_each_alone_with_joins_and_cancels(lm, compiled, tmp_path):
    """Compiled: the decode steps run model/decode_step.py's graph, checked against eager rows alone."""
    prompts = [ids(8 + 9 * i, 200 + i) for i in range(8)]
    want = [alone(lm, p, 12) for p in prompts]
    eng = Engine(lm, prefill_chunk=32, compile=compiled, compile_dir=str(tmp_path))
    sched = eng.scheduler
    spies = [Spy() for _ in prompts]
    seqs = [new_seq(lm, p, 12, spy=s) for p, s in zip(prompts, spies, strict=True)]
    for s in seqs[:5]:
        sched.add(s)
    for _ in range(6):
        sched.step()
    for s in seqs[5:]:  # join mid-batch
        sched.add(s)
    sched.step()
    seqs[2].cancel()  # cancelled mid-batch
    while sched.has_work():
        sched.step()
    for i, s in enumerate(seqs):
        toks, reason = drain(s)
        if i == 2:
            assert reason == "cancelled" and toks == want[i][0][: len(toks)]
            continue
        assert reason == "length" and toks == want[i][0], f"row {i}"
        for j, (got, ref) in enumerate(zip(spies[i].seen, want[i][1], strict=True)):
            assert torch.allclose(got, ref, atol=ATOL), f"row {i} step {j}"
    assert sched.steps < sum(12 for _ in seqs)  # rows really shared forwards
    if compiled:
        assert sched.decode.failed is None and sched.decode.calls > 0
    assert eng.pool.blocks_used == len(eng.pool.cached)  # every block is released, some stay cached


def test_long_prompt_joins_with_at_most_one_chunk_per_step(lm):
    eng = Engine(lm, prefill_chunk=16)
    sched = eng.scheduler
    runner = new_seq(lm, ids(10, 210), 30)
    sched.add(runner)
    sched.step()  # prefill of the runner, first token
    sched.add(new_seq(lm, ids(120, 211), 2))
    fed_before = runner.computed
    for step in range(8):  # the newcomer needs 8 chunks of 16; the runner gets a token every step
        sched.step()
        assert runner.computed == fed_before + step + 1
    assert len(runner.generated) >= 8


def test_preemption_under_a_small_pool_gives_the_same_tokens(lm):
    prompts = [ids(40, 220 + i) for i in range(4)]
    want = [alone(lm, p, 20)[0] for p in prompts]
    per_block = Engine(lm, block_size=4).pool.block_bytes
    eng = Engine(lm, kv_budget_bytes=40 * per_block, block_size=4)  # 160 slots: not all four at once
    seqs = [new_seq(lm, p, 20) for p in prompts]
    for s in seqs:
        eng.scheduler.add(s)
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert [drain(s)[0] for s in seqs] == want


def test_admission_is_round_robin_across_owners(lm):
    eng = Engine(lm, max_batch=2)
    sched = eng.scheduler
    flood = [new_seq(lm, ids(5, 230 + i), 3, owner="bob") for i in range(6)]
    for s in flood:
        sched.add(s)
    alice = new_seq(lm, ids(5, 240), 3, owner="alice")
    sched.add(alice)
    sched.step()
    assert alice in sched.running  # admitted in the first pair, ahead of bob's other five


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gemma3_sliding_window_batched_equals_full_forward(hf_dir_factory, compiled, tmp_path):
    """Gemma 3's sliding layers (window 8) gather only the window's slots; decode rows of
    different lengths in one batch still match an uncached forward of each row's tokens."""
    from types import SimpleNamespace

    from model.decode_step import CompiledDecode
    from model.paged_cache import BlockPool
    from model.scheduler import Scheduler

    _hf, path = hf_dir_factory("gemma3")
    model = ours_from_hf_dir(path)
    ref_lm = SimpleNamespace(model=model)
    pool = BlockPool.for_model(model, 1 << 22, block_size=4)
    decode = CompiledDecode(model, pool, tmp_path) if compiled else None
    sched = Scheduler(model, pool, eos_ids=set(), context_window=256, prefill_chunk=24, decode=decode)
    spies = [Spy() for _ in range(3)]
    prompts = [ids(n, 250 + n, vocab=128) for n in (5, 19, 37)]
    seqs = [Sequence(p, SamplingParams(temperature=0, max_tokens=6), processors=[s])
            for p, s in zip(prompts, spies, strict=True)]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        sched.step()
    for p, s, spy in zip(prompts, seqs, spies, strict=True):
        for j, got in enumerate(spy.seen):
            assert torch.allclose(got, full_logits(ref_lm, p + s.generated[:j]), atol=ATOL), (len(p), j)
    if compiled:
        assert decode.failed is None and decode.calls > 0


def test_samples_of_one_prompt_share_its_blocks(lm):
    """n samples submitted together: one prefills, the others wait a step and map its blocks."""
    eng = Engine(lm, block_size=4)
    prompt = ids(41, 260)
    seqs = [Sequence(prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=5)) for i in range(4)]
    for s in seqs:
        eng.scheduler.add(s)
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert sorted(s.cached_tokens for s in seqs) == [0, 40, 40, 40]
    assert len({tuple(s.generated) for s in seqs}) > 1  # different seeds, different samples


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_rows_on_cuda_bf16_match_cpu_float32_greedy_closely():
    """The same scheduler on CUDA in bfloat16: rows batched give the tokens each gives alone."""
    from model.registry import LoadedModel

    cpu = tiny_lm()
    dev = torch.device("cuda")
    lm = LoadedModel("tiny", cpu.args, cpu.model.to(dev, torch.bfloat16), cpu.tokenizer, cpu.context_window, dev,
                     torch.bfloat16, None)
    prompts = [ids(10 + 5 * i, 300 + i) for i in range(6)]
    alone_ids = [Engine(lm).complete(p, SamplingParams(temperature=0, max_tokens=8)).token_ids for p in prompts]
    eng = Engine(lm)
    seqs = [Sequence(p, SamplingParams(temperature=0, max_tokens=8)) for p in prompts]
    for s in seqs:
        eng.scheduler.add(s)
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert sum(s.generated == a[: len(s.generated)] for s, a in zip(seqs, alone_ids, strict=True)) >= 5
