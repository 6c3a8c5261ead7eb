"""Engine tests on tiny random-weight models (our own Transformer class, float32, CPU).

The reference for every cached path is a plain full forward (`model(ids, pos, None)`) over the
same tokens: KV-cached decode, session reuse, prefix clones and shifts must match it.
"""

from __future__ import annotations

import base64
import functools
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from model.config import ModelArgs
from model.engine import Engine, find_shift
from model.llama import Transformer
from model.registry import LoadedModel
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
ATOL = 1e-4


@functools.cache
def byte_tokenizer() -> Tokenizer:
    """A real Tokenizer (tiktoken backend) whose 256 ordinary tokens are single bytes, plus
    BOS and two end tokens: tiny models can use a real tokenizer with a 259-entry vocabulary."""
    path = Path(tempfile.mkdtemp(prefix="memento-bytes-")) / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    specials = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|eot_id|>": 258}
    return Tokenizer.from_tiktoken(path, special_tokens=specials)


def tiny_lm(n_layers: int = 2, max_seq_len: int = 256, seed: int = 0) -> LoadedModel:
    tok = byte_tokenizer()
    args = ModelArgs(family="llama", vocab_size=tok.vocab_size, dim=64, n_layers=n_layers, n_heads=4,
                     n_kv_heads=2, hidden_dim=96, norm_eps=1e-6, context_length=max_seq_len,
                     max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.15)
    model = model.eval().requires_grad_(False)
    return LoadedModel("tiny", args, model, tok, max_seq_len, torch.device("cpu"), torch.float32, None)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def ids(n: int, seed: int, vocab: int = 256) -> list[int]:
    """n random byte tokens (no specials, so never EOS)."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(lm, tokens) -> torch.Tensor:
    """Reference: the last position's logits of one uncached forward over `tokens`."""
    with torch.inference_mode():
        t = torch.tensor([tokens])
        out = lm.model(t, torch.arange(len(tokens)), None)[0, -1]
    return out.clone()  # a normal tensor, editable outside inference mode


class Spy:
    """Logit processor that records the logits it sees (and can force tokens)."""

    def __init__(self, force=None):
        self.seen: list[torch.Tensor] = []
        self.force = force

    def __call__(self, generated, logits):
        self.seen.append(logits.clone())
        if self.force is not None:
            out = torch.full_like(logits, float("-inf"))
            out[self.force[len(generated)]] = 0.0
            return out
        return logits


def no_eos(lm):
    eos = sorted(lm.tokenizer.eos_ids)

    def proc(generated, logits):
        return logits.index_fill(0, torch.tensor(eos, device=logits.device), float("-inf"))

    return proc


def test_cached_decode_equals_full_recomputation(lm):
    eng = Engine(lm)
    prompt = ids(20, 1)
    spy = Spy()
    out = eng.complete(prompt, SamplingParams(temperature=0, max_tokens=12), logits_processors=[spy, no_eos(lm)])
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    for i, tok in enumerate(out.token_ids):
        ref = full_logits(lm, prompt + out.token_ids[:i])
        assert torch.allclose(spy.seen[i], ref, atol=ATOL), f"step {i}"
        ref[sorted(lm.tokenizer.eos_ids)] = float("-inf")
        assert int(ref.argmax()) == tok, f"greedy token {i}"
    assert out.usage.prompt_tokens == 20 and out.usage.completion_tokens == 12 and out.usage.cached_tokens == 0


def test_chunked_prefill_equals_one_pass(lm):
    prompt = ids(70, 2)
    spy = Spy()
    Engine(lm, prefill_chunk=16).complete(prompt, SamplingParams(temperature=0, max_tokens=1), logits_processors=[spy])
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt), atol=ATOL)


def test_session_reuse_over_three_turns_matches_fresh_prefill(lm):
    eng = Engine(lm)
    conv = ids(30, 3)
    params = SamplingParams(temperature=0, max_tokens=6)
    expected_cached = 0
    for turn in range(3):
        spy = Spy()
        out = eng.complete(conv, params, session_id="s", logits_processors=[spy, no_eos(lm)])
        assert out.usage.cached_tokens == expected_cached, f"turn {turn}"
        assert out.usage.prompt_tokens == len(conv)
        assert torch.allclose(spy.seen[0], full_logits(lm, conv), atol=ATOL), f"turn {turn}"
        # the cache holds the prompt and every reply token but the last (never forwarded)
        assert eng.session_tokens("s") == conv + out.token_ids[:-1]
        conv = conv + out.token_ids + ids(10, 10 + turn)  # next user message
        expected_cached = len(eng.session_tokens("s"))


def test_repeated_prompt_reprefills_only_last_token(lm):
    eng = Engine(lm)
    prompt = ids(25, 4)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s")
    spy = Spy()
    out = eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s", logits_processors=[spy])
    assert out.usage.cached_tokens == 24
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt), atol=ATOL)


def test_edited_history_truncates_to_common_prefix(lm):
    eng = Engine(lm)
    prompt = ids(30, 5)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=4), session_id="s")
    edited = prompt[:12] + ids(8, 6)
    spy = Spy()
    out = eng.complete(edited, SamplingParams(temperature=0, max_tokens=1), session_id="s", logits_processors=[spy])
    assert out.usage.cached_tokens == 12
    assert torch.allclose(spy.seen[0], full_logits(lm, edited), atol=ATOL)


def test_shared_prefix_is_cloned_and_gives_identical_results(lm):
    persona = ids(40, 7)
    eng = Engine(lm)
    eng.complete(persona + ids(5, 8), GREEDY, session_id="a", prefix_len=40)
    assert tuple(persona) in eng.prefixes
    prompt_b = persona + ids(6, 9)
    spy = Spy()
    out = eng.complete(prompt_b, GREEDY, session_id="b", prefix_len=40, logits_processors=[spy])
    assert out.usage.cached_tokens == 40
    fresh = Engine(lm).complete(prompt_b, GREEDY)
    assert out.token_ids == fresh.token_ids and out.usage.cached_tokens == 40
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt_b), atol=ATOL)
    # session a is untouched by b's clone
    spy_a = Spy()
    prompt_a = eng.session_tokens("a") + ids(3, 11)
    eng.complete(prompt_a, GREEDY, session_id="a", logits_processors=[spy_a])
    assert torch.allclose(spy_a.seen[0], full_logits(lm, prompt_a), atol=ATOL)


def test_shared_prefix_detected_without_hint(lm):
    persona = ids(40, 12)
    eng = Engine(lm)
    eng.complete(persona + ids(5, 13), GREEDY, session_id="a")
    spy = Spy()
    prompt_c = persona + ids(5, 14)
    out = eng.complete(prompt_c, GREEDY, session_id="c", logits_processors=[spy])
    assert out.usage.cached_tokens == 40  # cloned from session a's cache
    assert tuple(persona) in eng.prefixes  # remembered for the next session with this persona
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt_c), atol=ATOL)
    eng.drop_session("a")
    eng.drop_session("c")
    out = eng.complete(persona + ids(5, 15), GREEDY, session_id="d")
    assert out.usage.cached_tokens == 40  # from the remembered prefix


def test_lru_eviction_respects_budget(lm):
    probe = Engine(lm)
    probe.complete(ids(30, 16), GREEDY, session_id="x")
    one = probe.cache_bytes()
    eng = Engine(lm, kv_budget_bytes=2 * one)
    prompts = {s: ids(30, 20 + i) for i, s in enumerate("abc")}
    for s in "abc":
        eng.complete(prompts[s], GREEDY, session_id=s)
        assert eng.cache_bytes() <= eng.kv_budget_bytes
    assert list(eng.sessions) == ["b", "c"]  # a, least recently used, was dropped (CPU: no host tier)
    # using b makes c the oldest
    out_b = eng.complete(prompts["b"], GREEDY, session_id="b")
    assert out_b.usage.cached_tokens == 29
    eng.complete(prompts["a"], GREEDY, session_id="a")
    assert list(eng.sessions) == ["b", "a"]


def test_decode_hits_window_and_shifts(lm):
    lm1 = tiny_lm(n_layers=1, max_seq_len=48)  # one layer: K/V depend only on token and position
    eng = Engine(lm1)
    spy = Spy()
    prompt = ids(30, 30)
    params = SamplingParams(temperature=0, max_tokens=40)
    out = eng.complete(prompt, params, session_id="s", prefix_len=4, logits_processors=[spy, no_eos(lm1)])
    assert out.finish_reason == "length" and len(out.token_ids) == 40
    kept = eng.session_tokens("s")
    assert kept[:4] == prompt[:4] and len(kept) < 48
    # after the shift, logits equal a fresh prefill of the kept tokens (exact for one layer)
    assert torch.allclose(spy.seen[-1], full_logits(lm1, kept), atol=ATOL)


def test_shift_session_and_prompt_with_dropped_block_reuses_cache():
    lm1 = tiny_lm(n_layers=1)
    eng = Engine(lm1)
    prompt = ids(60, 31)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s")
    # the memory layer dropped an old block in the middle: prompt = cached[:8] + cached[28:] + new
    new_prompt = prompt[:8] + prompt[28:] + ids(5, 32)
    spy = Spy()
    out = eng.complete(new_prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s",
                       logits_processors=[spy])
    assert out.usage.cached_tokens == 8 + 32
    assert torch.allclose(spy.seen[0], full_logits(lm1, new_prompt), atol=ATOL)
    eng.shift_session("s", keep=2, drop=10)
    assert eng.session_tokens("s") == new_prompt[:2] + new_prompt[12:]
    with pytest.raises(KeyError):
        eng.shift_session("nope", 1, 1)


def test_shift_is_approximate_for_deep_models(lm):
    """With more layers the kept K/V still carry traces of the dropped tokens (as in llama.cpp):
    documented tolerance is 'same ballpark', checked loosely here."""
    eng = Engine(lm)
    prompt = ids(60, 33)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s")
    eng.shift_session("s", keep=4, drop=20)
    kept = eng.session_tokens("s")
    spy = Spy()
    eng.complete(kept, SamplingParams(temperature=0, max_tokens=1), session_id="s", logits_processors=[spy])
    ref = full_logits(lm, kept)
    rel = (spy.seen[0] - ref).norm() / ref.norm()
    assert rel < 1.0


def test_find_shift():
    cached = list(range(20))
    assert find_shift(cached, cached[:5] + cached[9:] + [99], 1) == (5, 4, 16)
    assert find_shift(cached, cached[:5] + [77], 1) is None


def test_cancellation_keeps_cache_consistent(lm):
    eng = Engine(lm)
    prompt = ids(20, 40)
    n = {"tokens": 0}

    def should_stop():
        return n["tokens"] >= 3

    events = []
    for ev in eng.generate(prompt, SamplingParams(temperature=0, max_tokens=50), session_id="s",
                           should_stop=should_stop, logits_processors=[no_eos(lm)]):
        events.append(ev)
        if ev.token_id is not None:
            n["tokens"] += 1
    final = events[-1]
    assert final.finished and final.finish_reason == "cancelled" and final.usage.completion_tokens == 3
    generated = [e.token_id for e in events[:-1]]
    assert eng.session_tokens("s") == prompt + generated  # every yielded token was forwarded
    nxt = prompt + generated + ids(4, 41)
    spy = Spy()
    out = eng.complete(nxt, GREEDY, session_id="s", logits_processors=[spy])
    assert out.usage.cached_tokens == len(prompt) + 3
    assert torch.allclose(spy.seen[0], full_logits(lm, nxt), atol=ATOL)


def test_logits_processor_forces_tokens_and_stop_string_cuts(lm):
    tok = lm.tokenizer
    forced = tok.encode("Hello there. STOP and more")
    eng = Engine(lm)
    out = eng.complete(ids(10, 42), SamplingParams(temperature=0.9, max_tokens=len(forced), stop=["STOP"]),
                       logits_processors=[Spy(force=forced)])
    assert out.text == "Hello there. " and out.finish_reason == "stop"
    out = eng.complete(ids(10, 42), SamplingParams(temperature=0.9, max_tokens=5),
                       logits_processors=[Spy(force=forced)])
    assert out.token_ids == forced[:5] and out.text == tok.decode(forced[:5]) and out.finish_reason == "length"


def test_character_cut_by_max_tokens_is_not_shown_as_replacement(lm):
    forced = lm.tokenizer.encode("안녕")  # 6 byte tokens: 4 of them end mid-character
    out = Engine(lm).complete(ids(10, 44), SamplingParams(temperature=0.9, max_tokens=4),
                              logits_processors=[Spy(force=forced)])
    assert out.finish_reason == "length" and out.text == "안"


def test_eos_finishes_with_stop(lm):
    eos = next(iter(lm.tokenizer.eos_ids))
    out = Engine(lm).complete(ids(10, 43), GREEDY, logits_processors=[Spy(force=[eos])])
    assert out.finish_reason == "stop" and out.token_ids == [] and out.text == ""


def test_streamed_events_and_seeded_sampling(lm):
    eng = Engine(lm)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=5)
    a = eng.complete(ids(10, 44), params)
    b = eng.complete(ids(10, 44), params)
    assert a.token_ids == b.token_ids
    events = list(eng.generate(ids(10, 44), params))
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert "".join(e.text for e in events) == a.text


def test_bad_input_is_rejected_before_iteration(lm):
    eng = Engine(lm)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([lm.args.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="context window"):
        eng.generate([5] * lm.context_window, GREEDY)


def test_one_generation_at_a_time(lm):
    eng = Engine(lm)
    it = eng.generate(ids(10, 45), GREEDY)
    next(it)  # holds the lock now
    got = []
    t = threading.Thread(target=lambda: got.append(eng.complete(ids(10, 46), GREEDY)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # waits for the first generation
    list(it)
    t.join(5)
    assert got and got[0].finish_reason in ("stop", "length")


def test_lock_is_free_once_the_final_event_is_read(lm):
    eng = Engine(lm)
    for ev in eng.generate(ids(10, 47), GREEDY, session_id="a"):
        if ev.finished:
            break  # as the service and complete() do: the generator stays suspended
    t = threading.Thread(target=eng.drop_session, args=("a",))
    t.start()
    t.join(5)
    assert not t.is_alive() and eng.session_tokens("a") is None


@pytest.mark.slow
def test_compiled_decode_equals_eager(lm):
    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [ids(20, 50), ids(15, 51)]
    eager = Engine(lm)
    comp = Engine(lm, compile=True, compile_capacity=128)
    for turn in range(2):
        for i, p in enumerate(prompts):
            spy_e, spy_c = Spy(), Spy()
            a = eager.complete(p, params, session_id=str(i), logits_processors=[spy_e, no_eos(lm)])
            b = comp.complete(p, params, session_id=str(i), logits_processors=[spy_c, no_eos(lm)])
            assert a.token_ids == b.token_ids, f"turn {turn} session {i}"
            assert a.usage == b.usage
            for x, y in zip(spy_e.seen, spy_c.seen, strict=True):
                assert torch.allclose(x, y, atol=ATOL)
            prompts[i] = p + a.token_ids + ids(3, 60 + i + turn)
    assert comp._compiled.owner is comp.sessions["1"]  # the compiled path really ran


def test_bench_gpu_section_runs_small_on_cpu():
    from model.bench import gpu_bandwidth_gbps, gpu_section

    assert gpu_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu_bandwidth_gbps("NVIDIA H200") == 4800.0
    out = gpu_section(byte_tokenizer(), bandwidth_gbps=10.0, n_tokens=8, device="cpu", dtype=torch.float32,
                      shape=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96), modes=("eager",))
    assert out["eager_decode_tok_s"] > 0
    assert out["bound_tok_s"] == pytest.approx(10e9 / out["weight_bytes"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_on_gpu():
    cpu_lm = tiny_lm()
    dev = torch.device("cuda")
    lm = LoadedModel("tiny", cpu_lm.args, cpu_lm.model.to(dev), cpu_lm.tokenizer, cpu_lm.context_window, dev,
                     torch.float32, None)
    params = SamplingParams(temperature=0, max_tokens=12)
    eager, comp = Engine(lm), Engine(lm, compile=True, compile_capacity=128)
    for i, p in enumerate([ids(20, 70), ids(25, 71), ids(20, 70) + ids(5, 72)]):
        a = eager.complete(p, params, session_id=str(i % 2), logits_processors=[no_eos(lm)])
        b = comp.complete(p, params, session_id=str(i % 2), logits_processors=[no_eos(lm)])
        assert a.token_ids == b.token_ids and a.usage == b.usage


def test_lookup_speculation_same_output_fewer_forwards(lm):
    """Greedy decoding verifies prompt-lookup drafts: same tokens and logits, fewer forwards."""
    rep = ids(8, 80)
    prompt, forced = rep * 3, rep * 4
    results = {}
    for spec in (0, 4):
        calls = []
        hook = lm.model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        eng = Engine(lm, speculate=spec)
        spy = Spy(force=forced)
        try:
            out = eng.complete(prompt, SamplingParams(temperature=0, max_tokens=24), session_id="s",
                               logits_processors=[spy])
        finally:
            hook.remove()
        # the cache holds exactly the tokens it says, and the next turn continues correctly
        tokens = eng.session_tokens("s")
        assert tokens == (prompt + out.token_ids)[: len(tokens)] and eng.sessions["s"].cache.length == len(tokens)
        nxt = prompt + out.token_ids + ids(3, 81)
        spy2 = Spy()
        eng.complete(nxt, GREEDY, session_id="s", logits_processors=[spy2])
        assert torch.allclose(spy2.seen[0], full_logits(lm, nxt), atol=ATOL)
        results[spec] = (out.token_ids, spy.seen, len(calls))
    assert results[0][0] == results[4][0] == forced[:24]
    for a, b in zip(results[0][1], results[4][1], strict=True):
        assert torch.allclose(a, b, atol=ATOL)
    assert results[4][2] < results[0][2] / 2


def test_lookup_draft():
    from model.engine import lookup_draft

    assert lookup_draft([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # latest occurrence wins
    assert lookup_draft([1, 2, 3, 4], 3) == [] and lookup_draft([1, 2, 3, 1, 2, 3], 0) == []
