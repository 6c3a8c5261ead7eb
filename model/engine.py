"""`Engine`: many generations at once from any number of threads, batched by one scheduler thread.

    eng = Engine(lm)                                   # lm from model.load_model(...)
    for ev in eng.generate(prompt_ids, SamplingParams(temperature=0), session_id="s1", owner="alice"):
        print(ev.text, end="")

Each `generate` call becomes a `Sequence` for the scheduler (model/scheduler.py), which decodes
every running sequence in one forward per step over a paged KV cache (model/paged_cache.py). This
file is the thin layer above it: it checks input, turns token ids into text (UTF-8-safe streaming
decode, stop strings), and blocks the calling thread on its sequence's queue. Calls from several
threads batch together; a single call behaves as before.

What makes a chat turn cheap: a finished turn's full blocks stay in the pool, indexed by content
and owner, so the next turn of the session (whose prompt starts with the previous one) maps them
instead of prefilling again; a new session with the same persona maps the persona's blocks, the
only blocks ever shared across owners. Unused blocks are evicted least recently used first.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from model.fused_decode import FusedDecode
from model.paged_cache import BlockPool
from model.sampling import LogitsProcessor, SamplingParams, StopMatcher, dry_breaker_ids
from model.scheduler import MAX_BATCH, PREFILL_CHUNK, Scheduler
from model.sequence import Sequence

log = logging.getLogger(__name__)

CPU_DEFAULT_BUDGET = 1 << 30  # 1 GiB of KV cache when the model runs on CPU
GPU_BUDGET_FRACTION = 0.5  # of the GPU memory free after loading the model
BLOCK_SIZE = 16  # tokens per KV block


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the cache (not prefilled this turn)


@dataclass
class GenerationEvent:
    text: str  # new text since the previous event, stop strings already cut
    token_id: int | None  # None on the final event
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the final event
    usage: Usage | None = None  # on the final event
    logprob: float | None = None  # with SamplingParams.logprobs: log p(token_id) after penalties
    top_logprobs: list[tuple[int, float]] | None = None  # the `logprobs` most likely (id, log p)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


class Engine:
    def __init__(self, lm, kv_budget_bytes: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 max_batch: int = MAX_BATCH, block_size: int = BLOCK_SIZE, compile: bool = False,
                 compile_dir: str | None = None, progress: bool = False, threads: int | None = None,
                 fused_decode: bool = True):
        """`kv_budget_bytes`: the KV pool's size; None -> 1 GiB on CPU, half of the free GPU
        memory on CUDA. `max_batch`: sequences decoding together; `prefill_chunk`: prompt tokens
        fed per step (bounds how long a new prompt delays the others). `compile`: single-row decode
        steps run as one compiled graph (model/decode_step.py), compiled here, before the first request,
        with inductor's artefacts kept in `compile_dir`; `progress` reports it on stderr.
        `threads`: intra-op threads of the scheduler thread (None: torch's current setting).
        `fused_decode`: decode rows run through model/decode_layer.c where the model fits it (a
        Llama-family or Gemma 3 GGUF kept in model/q4dot.c's layout, on the CPU;
        model/fused_decode.py), which then takes the place of the compiled step.

        libgomp stops spin-waiting once a process holds more OpenMP threads than cores, and every
        thread that ever ran a parallel op keeps its own team: a model loaded on one thread and
        run on this engine's would wake its workers through futexes (an int4 matmul: 21 us -> 75
        us). Callers that can should load with torch.set_num_threads(1) and pass `threads` here,
        so that the scheduler thread's team is the only one (service/runtime.py does)."""
        self.lm = lm
        self.threads = threads or torch.get_num_threads()
        self.model = lm.model
        self.device = torch.device(lm.device)
        self.context_window = int(lm.context_window)
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else self._default_budget()
        self.pool = BlockPool.for_model(self.model, self.kv_budget_bytes, block_size, self.device)
        decode, self.compile_report = None, None
        if fused_decode and self.device.type == "cpu":
            decode = FusedDecode.for_model(self.model, self.pool)
            if decode is not None and progress:
                print("decode steps run through the C decode layer (model/decode_layer.c)", file=sys.stderr, flush=True)
        if decode is None and compile:
            from model.decode_step import CompiledDecode

            decode = CompiledDecode(self.model, self.pool, compile_dir, progress)
            self.compile_report = decode.warm_up()
        self.scheduler = Scheduler(self.model, self.pool, lm.tokenizer.eos_ids, self.context_window,
                                   max_batch=max_batch, prefill_chunk=prefill_chunk, decode=decode)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._breakers: dict[tuple[str, ...], tuple[int, ...]] = {}  # DRY breaker strings -> ids

    # ---- public API -------------------------------------------------------------------------

    def generate(self, prompt_ids: Seq[int], params: SamplingParams | None = None, session_id: str | None = None,
                 logits_processors: Seq[LogitsProcessor] = (), should_stop: Callable[[], bool] | None = None,
                 prefix_len: int | None = None, owner: str | None = None) -> Iterator[GenerationEvent]:
        """Stream a reply to `prompt_ids`. `prefix_len`: the first tokens are the pinned persona
        prefix, whose blocks may be shared with other owners; everything else is reused only by
        the same `owner`. Bad input raises here, before iteration; closing the iterator early
        cancels the request."""
        params = self._with_dry_breakers(params or SamplingParams())
        prompt = self._check_prompt(prompt_ids, prefix_len)
        seq = Sequence(prompt, params, owner=owner or "", session_id=session_id, prefix_len=prefix_len or 0,
                       processors=list(logits_processors), should_stop=should_stop)
        self._submit(seq)
        return self._stream(seq)

    def complete(self, prompt_ids: Seq[int], params: SamplingParams | None = None, session_id: str | None = None,
                 logits_processors: Seq[LogitsProcessor] = (), should_stop: Callable[[], bool] | None = None,
                 prefix_len: int | None = None, owner: str | None = None) -> Completion:
        parts, ids = [], []
        for ev in self.generate(prompt_ids, params, session_id, logits_processors, should_stop, prefix_len, owner):
            parts.append(ev.text)
            if ev.token_id is not None:
                ids.append(ev.token_id)
            if ev.finished:
                return Completion("".join(parts), ids, ev.finish_reason, ev.usage)
        raise RuntimeError("generation ended without a final event")  # unreachable

    def _with_dry_breakers(self, params: SamplingParams) -> SamplingParams:
        """DRY's sequence breakers as token ids of this vocabulary (computed once per breaker set)."""
        if not params.dry or params.dry_breaker_ids:
            return params
        key = tuple(params.dry_sequence_breakers)
        ids = self._breakers.get(key)
        if ids is None:
            tok = self.lm.tokenizer
            specials = set(getattr(getattr(tok, "specials", None), "ids", {}).values())
            ids = dry_breaker_ids(tok.vocab_texts(), key, set(tok.eos_ids) | specials)
            if len(self._breakers) >= 16:  # a client sending ever new breaker lists must not grow memory
                self._breakers.clear()
            self._breakers[key] = ids
        return dataclasses.replace(params, dry_breaker_ids=ids)

    def drop_session(self, session_id: str) -> bool:
        with self._cond:
            return self.scheduler.drop_session(session_id)

    def session_tokens(self, session_id: str) -> list[int] | None:
        """The tokens the session's last turn left cached (its prompt and all but the last reply token)."""
        with self._cond:
            rec = self.scheduler.sessions.get(session_id)
            return list(rec.tokens) if rec is not None else None

    @property
    def sessions(self):
        return self.scheduler.sessions

    def cache_bytes(self) -> int:
        """Bytes of KV blocks in use or cached for reuse."""
        return self.pool.used_bytes

    def stats(self) -> dict[str, int]:
        """For /metrics: the pool and the scheduler's queues (names follow vLLM's)."""
        with self._cond:
            p, s = self.pool, self.scheduler
            return {"kv_cache_bytes": p.used_bytes, "kv_pool_bytes": p.nbytes, "kv_blocks_total": p.num_blocks - 1,
                    "kv_bytes_per_token": p.block_bytes // p.block_size,
                    "kv_blocks_used": p.blocks_used, "kv_blocks_free": len(p.free), "kv_blocks_cached": len(p.cached),
                    "prefix_cache_queries": p.queries, "prefix_cache_hits": p.hits,
                    "num_requests_running": len(s.running), "num_requests_waiting": s.num_waiting}

    def close(self) -> None:
        """Stop the scheduler thread; requests still running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    # ---- the scheduler thread ---------------------------------------------------------------

    def _submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.scheduler.add(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="memento-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP team runs every step
        while True:
            with self._cond:
                while not self.scheduler.has_work() and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the engine was closed"))
                    return
                try:
                    self.scheduler.step()
                except Exception as exc:  # a scheduler bug must not leave callers waiting forever
                    log.exception("scheduler step failed")
                    self._fail_all(exc)
            time.sleep(0)  # the lock is free between steps: let new requests, drops and stats in

    def _fail_all(self, exc: BaseException) -> None:
        s = self.scheduler
        for seq in list(s.running) + [q for qs in s.waiting.values() for q in qs]:
            s._end(seq, error=exc)
        s.waiting.clear()

    # ---- the caller's side: token ids -> text -----------------------------------------------

    def _stream(self, seq: Sequence) -> Iterator[GenerationEvent]:
        detok = self.lm.tokenizer.stream_decoder()
        stops = StopMatcher(seq.params.stop)
        n = 0
        try:
            while True:
                kind, a, lp, top = seq.out.get()
                if kind == "error":
                    raise a
                if kind == "done":
                    # a character cut in half by max_tokens would flush as U+FFFD: never show it
                    tail = stops.push(detok.flush().rstrip("\ufffd")) + stops.flush()
                    yield self._final(seq, tail, a, n)
                    return
                n += 1
                yield GenerationEvent(stops.push(detok.push(a)), a, logprob=lp, top_logprobs=top)
                if stops.stopped:
                    seq.cancel()
                    yield self._final(seq, "", "stop", n)
                    return
        finally:
            seq.cancel()  # no-op once finished; frees the row when the consumer left early

    @staticmethod
    def _final(seq: Sequence, tail: str, reason: str, n: int) -> GenerationEvent:
        usage = Usage(len(seq.prompt), n, seq.cached_tokens)
        return GenerationEvent(tail, None, finished=True, finish_reason=reason, usage=usage)

    def _check_prompt(self, prompt_ids, prefix_len) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        vocab = self.lm.args.vocab_size
        if not prompt:
            raise ValueError("prompt_ids is empty: the model needs at least one token to start from")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids holds ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(prompt) >= self.context_window:
            raise ValueError(
                f"prompt has {len(prompt)} tokens but the context window is {self.context_window}: "
                "shorten the history (the memory strategy should keep it within the window)"
            )
        if prefix_len is not None and not 0 <= prefix_len <= len(prompt):
            raise ValueError(f"prefix_len={prefix_len} must be between 0 and the prompt length {len(prompt)}")
        return prompt

    def _default_budget(self) -> int:
        """CPU: 1 GiB. GPU: half of the memory free after loading the model."""
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_BUDGET_FRACTION)
        return CPU_DEFAULT_BUDGET
