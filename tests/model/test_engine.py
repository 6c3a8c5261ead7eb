"""Engine tests on tiny random-weight models (our own Transformer class, float32, CPU).

The reference for every cached path is a plain full forward (`model(ids, pos, None)`) over the
same tokens: paged decode, session reuse, shared prefixes and batched rows must match it.
Most tests use block_size=1 so reuse is exact to the token; block-granular reuse has its own test.
"""

from __future__ import annotations

import base64
import functools
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from model.config import ModelArgs
from model.engine import Engine
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


def engine(lm, **kw) -> Engine:
    kw.setdefault("block_size", 1)
    return Engine(lm, **kw)


def test_cached_decode_equals_full_recomputation(lm):
    eng = engine(lm)
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


@pytest.mark.parametrize("block_size", [1, 16])
def test_chunked_prefill_equals_one_pass(lm, block_size):
    prompt = ids(70, 2)
    spy = Spy()
    Engine(lm, prefill_chunk=16, block_size=block_size).complete(
        prompt, SamplingParams(temperature=0, max_tokens=1), logits_processors=[spy])
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt), atol=ATOL)


def test_session_reuse_over_three_turns_matches_fresh_prefill(lm):
    eng = engine(lm)
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


def test_reuse_is_by_whole_blocks(lm):
    eng = Engine(lm, block_size=16)
    prompt = ids(40, 4)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s")
    spy = Spy()
    out = eng.complete(prompt + ids(5, 5), SamplingParams(temperature=0, max_tokens=1), session_id="s",
                       logits_processors=[spy])
    assert out.usage.cached_tokens == 32  # two full blocks of 16; the partial third is recomputed
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt + ids(5, 5)), atol=ATOL)


def test_repeated_prompt_reprefills_only_last_token(lm):
    eng = engine(lm)
    prompt = ids(25, 4)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s")
    spy = Spy()
    out = eng.complete(prompt, SamplingParams(temperature=0, max_tokens=1), session_id="s", logits_processors=[spy])
    assert out.usage.cached_tokens == 24
    assert torch.allclose(spy.seen[0], full_logits(lm, prompt), atol=ATOL)


def test_edited_history_reuses_the_common_prefix(lm):
    eng = engine(lm)
    prompt = ids(30, 5)
    eng.complete(prompt, SamplingParams(temperature=0, max_tokens=4), session_id="s")
    edited = prompt[:12] + ids(8, 6)
    spy = Spy()
    out = eng.complete(edited, SamplingParams(temperature=0, max_tokens=1), session_id="s", logits_processors=[spy])
    assert out.usage.cached_tokens == 12
    assert torch.allclose(spy.seen[0], full_logits(lm, edited), atol=ATOL)


def test_persona_prefix_is_shared_across_owners_and_nothing_else(lm):
    persona = ids(40, 7)
    eng = engine(lm)
    first = persona + ids(10, 8)
    eng.complete(first, GREEDY, session_id="a", prefix_len=40, owner="alice")
    # bob sends alice's exact prompt: only the persona prefix is found, as for a wrong guess
    right = eng.complete(first + ids(3, 9), GREEDY, session_id="b", prefix_len=40, owner="bob")
    wrong = eng.complete(persona + ids(13, 10), GREEDY, session_id="c", prefix_len=40, owner="carol")
    assert right.usage.cached_tokens == wrong.usage.cached_tokens == 40
    # alice herself gets all of it, with logits equal to a fresh prefill
    spy = Spy()
    again = first + ids(3, 9)
    out = eng.complete(again, GREEDY, session_id="a2", prefix_len=40, owner="alice", logits_processors=[spy])
    assert out.usage.cached_tokens == len(first)
    assert torch.allclose(spy.seen[0], full_logits(lm, again), atol=ATOL)
    # without a persona hint nothing is shared across owners
    out = eng.complete(persona + ids(5, 11), GREEDY, owner="dave")
    assert out.usage.cached_tokens == 0


def test_drop_session_forgets_its_blocks_but_not_the_shared_prefix(lm):
    persona = ids(40, 12)
    eng = engine(lm)
    eng.complete(persona + ids(5, 13), GREEDY, session_id="a", prefix_len=40, owner="u")
    assert eng.drop_session("a") and eng.session_tokens("a") is None and not eng.drop_session("a")
    out = eng.complete(persona + ids(5, 13), GREEDY, session_id="a", prefix_len=40, owner="u")
    assert out.usage.cached_tokens == 40  # the persona blocks stayed; the session's own did not


def test_lru_eviction_keeps_within_the_pool(lm):
    bytes_per_token = Engine(lm, block_size=1).pool.block_bytes
    eng = Engine(lm, kv_budget_bytes=70 * bytes_per_token, block_size=1)  # room for about two prompts
    prompts = {s: ids(30, 20 + i) for i, s in enumerate("abc")}
    for s in "abc":
        eng.complete(prompts[s], GREEDY, session_id=s)
        assert eng.cache_bytes() <= eng.kv_budget_bytes
    assert eng.complete(prompts["c"], GREEDY, session_id="c").usage.cached_tokens == 29
    assert eng.complete(prompts["a"], GREEDY, session_id="a").usage.cached_tokens == 0  # evicted, oldest


def test_reply_reaching_the_window_ends_with_length(lm):
    lm1 = tiny_lm(n_layers=1, max_seq_len=48)
    out = engine(lm1).complete(ids(30, 30), SamplingParams(temperature=0, max_tokens=40),
                               logits_processors=[no_eos(lm1)])
    assert out.finish_reason == "length" and len(out.token_ids) == 48 - 30


def test_conversation_longer_than_the_window_keeps_working(lm):
    """The memory layer trims the prompt; the engine reuses what still matches (the pinned prefix)."""
    lm1 = tiny_lm(n_layers=2, max_seq_len=64)
    eng = engine(lm1)
    persona, history = ids(16, 31), []
    for turn in range(8):
        history += ids(12, 40 + turn)
        prompt = persona + history[-40:]  # what a window strategy would keep
        spy = Spy()
        out = eng.complete(prompt, SamplingParams(temperature=0, max_tokens=4), session_id="s", prefix_len=16,
                           logits_processors=[spy, no_eos(lm1)])
        assert out.usage.cached_tokens >= (16 if turn else 0) and len(out.token_ids) == 4
        assert torch.allclose(spy.seen[0], full_logits(lm1, prompt), atol=ATOL)
        history += out.token_ids


def test_cancellation_ends_the_row_and_the_cache_stays_consistent(lm):
    eng = engine(lm)
    prompt = ids(20, 40)
    n = {"tokens": 0}
    events = []
    for ev in eng.generate(prompt, SamplingParams(temperature=0, max_tokens=50), session_id="s",
                           should_stop=lambda: n["tokens"] >= 3, logits_processors=[no_eos(lm)]):
        events.append(ev)
        if ev.token_id is not None:
            n["tokens"] += 1
    final = events[-1]
    assert final.finished and final.finish_reason == "cancelled" and 3 <= final.usage.completion_tokens < 50
    generated = [e.token_id for e in events[:-1]]
    cached = eng.session_tokens("s")
    assert cached == (prompt + generated)[: len(cached)] and len(cached) >= len(prompt)
    nxt = prompt + generated + ids(4, 41)
    spy = Spy()
    out = eng.complete(nxt, GREEDY, session_id="s", logits_processors=[spy])
    assert out.usage.cached_tokens == len(cached)
    assert torch.allclose(spy.seen[0], full_logits(lm, nxt), atol=ATOL)


def test_logits_processor_forces_tokens_and_stop_string_cuts(lm):
    tok = lm.tokenizer
    forced = tok.encode("Hello there. STOP and more")
    eng = engine(lm)
    out = eng.complete(ids(10, 42), SamplingParams(temperature=0.9, max_tokens=len(forced), stop=["STOP"]),
                       logits_processors=[Spy(force=forced)])
    assert out.text == "Hello there. " and out.finish_reason == "stop"
    out = eng.complete(ids(10, 42), SamplingParams(temperature=0.9, max_tokens=5),
                       logits_processors=[Spy(force=forced)])
    assert out.token_ids == forced[:5] and out.text == tok.decode(forced[:5]) and out.finish_reason == "length"


def test_character_cut_by_max_tokens_is_not_shown_as_replacement(lm):
    forced = lm.tokenizer.encode("안녕")  # 6 byte tokens: 4 of them end mid-character
    out = engine(lm).complete(ids(10, 44), SamplingParams(temperature=0.9, max_tokens=4),
                              logits_processors=[Spy(force=forced)])
    assert out.finish_reason == "length" and out.text == "안"


def test_eos_finishes_with_stop(lm):
    eos = next(iter(lm.tokenizer.eos_ids))
    out = engine(lm).complete(ids(10, 43), GREEDY, logits_processors=[Spy(force=[eos])])
    assert out.finish_reason == "stop" and out.token_ids == [] and out.text == ""


def test_streamed_events_and_seeded_sampling(lm):
    eng = engine(lm)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=5)
    a = eng.complete(ids(10, 44), params)
    b = eng.complete(ids(10, 44), params)
    assert a.token_ids == b.token_ids
    events = list(eng.generate(ids(10, 44), params))
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert "".join(e.text for e in events) == a.text


def test_logprobs_and_penalties_reach_the_events(lm):
    eng = engine(lm)
    out = list(eng.generate(ids(10, 45), SamplingParams(temperature=0, max_tokens=3, logprobs=2)))
    for ev in out[:-1]:
        assert ev.logprob is not None and ev.logprob <= 0 and len(ev.top_logprobs) == 2
        assert ev.top_logprobs[0][0] == ev.token_id  # greedy: the chosen token is the most likely
    banned = out[0].token_id
    again = eng.complete(ids(10, 45), SamplingParams(temperature=0, max_tokens=1, logit_bias={banned: -100.0}))
    assert again.token_ids != [banned]


def test_bad_input_is_rejected_before_iteration(lm):
    eng = engine(lm)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([lm.args.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="context window"):
        eng.generate([5] * lm.context_window, GREEDY)


def test_a_failing_processor_fails_only_its_own_request(lm):
    eng = engine(lm)

    def boom(generated, logits):
        raise RuntimeError("processor exploded")

    results = {}

    def run(name, procs):
        try:
            results[name] = eng.complete(ids(10, 46), SamplingParams(temperature=0, max_tokens=20),
                                         logits_processors=procs)
        except RuntimeError as exc:
            results[name] = exc

    ts = [threading.Thread(target=run, args=("bad", [boom])), threading.Thread(target=run, args=("good", []))]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    assert isinstance(results["bad"], RuntimeError) and "exploded" in str(results["bad"])
    assert results["good"].finish_reason in ("stop", "length")


def test_abandoned_stream_frees_its_row(lm):
    eng = engine(lm)
    it = eng.generate(ids(10, 47), SamplingParams(temperature=0, max_tokens=200), session_id="a",
                      logits_processors=[no_eos(lm)])
    next(it)
    it.close()  # the client went away
    deadline = time.monotonic() + 5
    while eng.stats()["num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.stats()["num_requests_running"] == 0
    assert eng.complete(ids(5, 48), GREEDY).finish_reason in ("stop", "length")


def test_bench_gpu_section_runs_small_on_cpu():
    from model.bench import gpu_bandwidth_gbps, gpu_section

    assert gpu_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu_bandwidth_gbps("NVIDIA H200") == 4800.0
    out = gpu_section(byte_tokenizer(), bandwidth_gbps=10.0, n_tokens=8, device="cpu", dtype=torch.float32,
                      shape=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96), modes=("eager",))
    assert out["eager_decode_tok_s"] > 0
    assert out["bound_tok_s"] == pytest.approx(10e9 / out["weight_bytes"])


def test_dry_breakers_become_token_ids_of_the_vocabulary_and_generation_runs(lm):
    eng = engine(lm)
    p = eng._with_dry_breakers(SamplingParams(temperature=0.0, max_tokens=6, dry_multiplier=2.0))
    assert {10, ord(":"), ord('"'), ord("*")} <= set(p.dry_breaker_ids)  # byte tokens of the breakers
    assert lm.tokenizer.eos_ids <= set(p.dry_breaker_ids)  # turns may always end
    assert eng._with_dry_breakers(SamplingParams()).dry_breaker_ids == ()  # off: nothing computed
    out = eng.complete(ids(30, 1), SamplingParams(temperature=0.0, max_tokens=6, dry_multiplier=2.0))
    assert len(out.token_ids) >= 1


def test_the_scheduler_thread_runs_with_the_engines_thread_count():
    """Engine(threads=n) sets n on its own thread (the one whose OpenMP team runs every step),
    whatever the caller's thread uses; service/runtime.py loads with 1 and passes the real count."""
    import torch as _torch

    seen = []

    def record(_tokens, logits):
        seen.append(_torch.get_num_threads())
        return logits

    before = _torch.get_num_threads()
    lm = tiny_lm()
    eng = Engine(lm, threads=1 if before > 1 else 2)
    eng.complete(ids(5, 3), SamplingParams(temperature=0, max_tokens=2), logits_processors=[record])
    assert seen and set(seen) == {eng.threads}
    eng.close()
    _torch.set_num_threads(before)
