"""`Engine`: generation with each session's KV cache kept between turns.

    eng = Engine(lm)                                   # lm from model.load_model(...)
    for ev in eng.generate(prompt_ids, SamplingParams(temperature=0), session_id="s1"):
        print(ev.text, end="")

What makes a chat turn cheap:
- Session reuse: a session keeps its cache and the token ids in it. The next prompt (which
  contains the previous reply) reuses the longest common token prefix; only the rest is prefilled.
- Shared prefix: a new session whose prompt shares a long prefix (a persona's system prompt) with
  a known prefix or another session clones that cache instead of prefilling it again.
- Context shift: when decoding reaches the context window, the oldest half of the tokens after the
  pinned prefix is dropped and the kept keys are re-rotated (`model.shift_cache`), as llama.cpp
  does. A prompt that equals the cache with a middle block removed reuses the cache the same way.
- Memory budget: all caches together stay under `kv_budget_bytes` (default 1 GiB on CPU, half
  the free memory on a GPU); least recently used sessions move to host RAM (GPU) or are dropped.

What makes a token cheap: prefill in 512-token chunks with last-position logits only; greedy
decoding verifies prompt-lookup drafts (several tokens per forward, same output); optional
`compile=True` runs the one-token step through torch.compile over a static cache (CUDA graphs).
Context shift is exact for the re-rotation but, like llama.cpp's, approximate overall: kept
keys/values of deeper layers were computed while the dropped tokens were visible.

One generation runs at a time (a lock); the service's single worker owns the engine.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from model.sampling import (
    LogitsProcessor,
    SamplingParams,
    StopMatcher,
    apply_processors,
    make_generator,
    penalize,
    sample_penalized,
    token_logprobs,
)

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory on long prompts
MIN_SHARED_PREFIX = 16  # tokens: shorter common prefixes with other sessions are not worth a copy
PREFIX_CACHE_SIZE = 4  # shared-prefix caches kept (LRU)
CPU_DEFAULT_BUDGET = 1 << 30  # 1 GiB of KV cache when the model runs on CPU
GPU_BUDGET_FRACTION = 0.5  # of the GPU memory free after loading the model
SPECULATE = 4  # prompt-lookup draft tokens verified per forward when decoding greedily
HOST_BUDGET_FACTOR = 4  # evicted GPU caches kept in host RAM: up to this many times the GPU budget


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a cache (not prefilled this turn)


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


@dataclass
class _Entry:
    """A KV cache and the token ids whose keys/values it holds (len(tokens) == cache.length)."""

    cache: object  # model.kv_cache.KVCache
    tokens: list[int] = field(default_factory=list)
    n_keep: int = 0  # pinned prefix length: never dropped by a context shift
    on_host: bool = False


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_shift(cached: Sequence[int], prompt: Sequence[int], min_keep: int) -> tuple[int, int, int] | None:
    """If prompt == cached[:keep] + cached[keep+drop:keep+drop+m] + new, return (keep, drop, reused).

    `keep` is the common prefix; the dropped block is found by locating the prompt's next token
    run in the cache. Returns None when no such block gives more reuse than the plain prefix.
    """
    keep = common_prefix_len(cached, prompt)
    if keep < min_keep or keep >= len(prompt) or keep >= len(cached):
        return None
    best = None
    probe = prompt[keep]
    for start in range(keep + 1, len(cached)):
        if cached[start] != probe:
            continue
        m = common_prefix_len(cached[start:], prompt[keep:])
        if best is None or m > best[2] - keep:
            best = (keep, start - keep, keep + m)
        if start + m == len(cached):
            break  # matched through the end of the cache: no later start can reuse more
    return best if best is not None and best[2] > keep else None


def lookup_draft(context: Sequence[int], k: int, ngram: int = 3, window: int = 2048) -> list[int]:
    """Prompt-lookup draft: find the latest earlier occurrence of the last `ngram` tokens in the
    recent `window` of the context and propose the (up to k) tokens that followed it."""
    if k <= 0 or len(context) <= ngram:
        return []
    tail = list(context[-ngram:])
    lo = max(0, len(context) - window)
    for start in range(len(context) - ngram - 1, lo - 1, -1):
        if context[start] == tail[0] and list(context[start : start + ngram]) == tail:
            return list(context[start + ngram : start + ngram + k])
    return []


class Engine:
    def __init__(
        self,
        lm,
        kv_budget_bytes: int | None = None,
        compile: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
        host_budget_bytes: int | None = None,
        compile_capacity: int | None = None,
        speculate: int = SPECULATE,
    ):
        """`kv_budget_bytes`: cap on all KV caches on the model's device; None -> 1 GiB on CPU,
        half of the free GPU memory on CUDA. Evicted GPU caches wait in host RAM up to
        `host_budget_bytes` (default 4x the budget). `compile=True`: decode with a static cache
        and torch.compile (CUDA graphs on GPU); `compile_capacity` caps that cache's positions
        (default: the context window). `speculate`: greedy decoding verifies up to this many
        prompt-lookup draft tokens per forward (0 turns it off; output is the same either way)."""
        self.lm = lm
        self.model = lm.model
        self.device = torch.device(lm.device)
        self.context_window = int(lm.context_window)
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else self._default_budget()
        self.host_budget_bytes = (
            host_budget_bytes if host_budget_bytes is not None else HOST_BUDGET_FACTOR * self.kv_budget_bytes
        )
        self.prefill_chunk = prefill_chunk
        # drafts need a multi-token forward, which the compiled one-token step cannot take
        self.speculate = 0 if compile else speculate
        self.sessions: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self.prefixes: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._compiled = _CompiledDecode(self.model, self.device, compile_capacity) if compile else None
        if self._compiled is not None:
            self.context_window = min(self.context_window, self._compiled.capacity)

    # ---- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        session_id: str | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        should_stop: Callable[[], bool] | None = None,
        prefix_len: int | None = None,
    ) -> Iterator[GenerationEvent]:
        """Stream a reply to `prompt_ids`. `prefix_len`: the first tokens are a prefix (persona,
        system turn) shared by many sessions: cache it once and pin it against context shifts.
        Bad input raises here, before iteration; consume the iterator to the end (or close it)
        in the thread that started it, since it holds the engine's lock meanwhile."""
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt_ids, prefix_len)
        return self._locked(prompt, params, session_id, list(logits_processors), should_stop, prefix_len)

    def _locked(self, *args) -> Iterator[GenerationEvent]:
        with self._lock:
            for ev in self._generate(*args):
                if ev.finished:
                    break
                yield ev
            else:
                return
        # The final event goes out after the lock is released: consumers stop reading at it, and
        # a generator left suspended would hold the lock until garbage collection.
        yield ev

    def complete(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        session_id: str | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        should_stop: Callable[[], bool] | None = None,
        prefix_len: int | None = None,
    ) -> Completion:
        parts, ids = [], []
        for ev in self.generate(prompt_ids, params, session_id, logits_processors, should_stop, prefix_len):
            parts.append(ev.text)
            if ev.token_id is not None:
                ids.append(ev.token_id)
            if ev.finished:
                return Completion("".join(parts), ids, ev.finish_reason, ev.usage)
        raise RuntimeError("generation ended without a final event")  # unreachable

    def drop_session(self, session_id: str) -> bool:
        with self._lock:
            entry = self.sessions.pop(session_id, None)
            if entry is not None:
                self._release(entry, keep_data=False)
            return entry is not None

    def shift_session(self, session_id: str, keep: int, drop: int) -> None:
        """Drop `drop` cached tokens after the first `keep` ones, re-rotating the rest."""
        with self._lock:
            entry = self.sessions.get(session_id)
            if entry is None:
                raise KeyError(f"shift_session: no cached session {session_id!r}")
            self._shift(entry, keep, drop)

    def session_tokens(self, session_id: str) -> list[int] | None:
        entry = self.sessions.get(session_id)
        return list(entry.tokens) if entry is not None else None

    def cache_bytes(self, on_host: bool = False) -> int:
        entries = list(self.sessions.values()) + list(self.prefixes.values())
        return sum(e.cache.nbytes for e in entries if e.on_host == on_host)

    # ---- one generation ---------------------------------------------------------------------

    def _generate(self, prompt, params, session_id, processors, should_stop, prefix_len):
        entry, cached = self._prepare(prompt, session_id, prefix_len)
        if session_id is not None:
            old = self.sessions.get(session_id)
            if old is not None and old is not entry:  # replaced by a clone that shares more
                self._release(old, keep_data=False)
            self.sessions[session_id] = entry
            self.sessions.move_to_end(session_id)
            self._enforce_budget(keep=entry)
        if prefix_len and cached >= prefix_len:
            self._remember_prefix(entry, prefix_len)
        try:
            logits = self._prefill(entry, prompt, start=cached, prefix_len=prefix_len)
            reason, generated, tail = yield from self._decode_loop(entry, prompt, logits, params, processors, should_stop)
        except GeneratorExit:  # the consumer stopped early: the cache is consistent at every yield
            if session_id is None:
                self._release(entry, keep_data=False)
            raise
        except BaseException:  # a failed forward may leave the cache half-written
            self._forget(session_id, entry)
            raise
        if session_id is None:
            self._release(entry)
        else:
            self._enforce_budget(keep=entry)
        usage = Usage(len(prompt), len(generated), cached)
        yield GenerationEvent(tail, None, finished=True, finish_reason=reason, usage=usage)

    def _decode_loop(self, entry, prompt, logits, params, processors, should_stop):
        """Sample, stream text, forward; returns (finish_reason, generated ids, held-back text).

        Greedy decoding may also verify a draft (prompt lookup, see `lookup_draft`): the sampled
        token and the draft go through one forward; each draft token is kept only while it equals
        what greedy decoding picks from the logits before it, so the output is unchanged.
        """
        eos = set(self.lm.tokenizer.eos_ids)
        gen = make_generator(params.seed, "cpu")
        detok = self.lm.tokenizer.stream_decoder()
        stops = StopMatcher(params.stop)
        context = list(prompt)  # repetition penalty looks at the whole context (HF semantics)
        generated: list[int] = []
        rows = [logits[0, -1]]  # next-token logits not yet used; more than one after a draft
        draft: list[int] = []  # fed but not yet confirmed tokens (their KV is in the cache)

        def finish(reason: str, tail: bool = True):
            self._truncate(entry, len(entry.tokens) - len(draft))  # drop unconfirmed draft KV
            # a character cut in half by max_tokens would flush as U+FFFD: never show it
            rest = detok.flush().rstrip("\ufffd")
            return reason, generated, (stops.push(rest) + stops.flush()) if tail else ""

        while True:
            if should_stop is not None and should_stop():
                return finish("cancelled")
            # a plain copy (not an inference tensor) so processors may edit it in place
            scores = apply_processors(processors, generated, rows.pop(0).clone())
            scores = penalize(scores, params, context, generated)
            tok = sample_penalized(scores, params, gen)
            lp = token_logprobs(scores, tok, params.logprobs) if params.logprobs is not None else (None, None)
            if draft and tok == draft[0]:
                draft.pop(0)  # confirmed: its KV is cached and the next row follows it
            elif draft:
                self._truncate(entry, len(entry.tokens) - len(draft))
                draft, rows = [], []
            if tok in eos:
                return finish("stop")
            generated.append(tok)
            context.append(tok)
            yield GenerationEvent(stops.push(detok.push(tok)), tok, logprob=lp[0], top_logprobs=lp[1])
            if stops.stopped:
                return finish("stop", tail=False)
            if len(generated) == params.max_tokens:
                # the last token is not forwarded: the next turn's prompt carries it anyway
                return finish("length")
            if rows:
                continue  # tok was a confirmed draft token: its logits row is already there
            room = params.max_tokens - len(generated) - 1
            draft = lookup_draft(context, min(self.speculate, room)) if params.greedy else []
            out = self._decode_one(entry, [tok] + draft)
            if out is None:
                return finish("length")
            rows = list(out[0])
            draft = draft[: len(rows) - 1]

    def _forget(self, session_id, entry: _Entry) -> None:
        self._release(entry, keep_data=False)
        if session_id is not None and self.sessions.get(session_id) is entry:
            del self.sessions[session_id]

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

    # ---- cache selection: own session, shifted session, shared prefix -----------------------

    def _prepare(self, prompt: list[int], session_id, prefix_len) -> tuple[_Entry, int]:
        """Pick the cache to continue from; return it (truncated to the reused prefix) and the
        number of prompt tokens it already holds. At least one prompt token is always left to
        prefill, since its logits start the reply."""
        own = self.sessions.get(session_id) if session_id is not None else None
        best, best_n = own, common_prefix_len(own.tokens, prompt) if own is not None else 0
        if own is not None and best_n < len(prompt) - 1:
            shift = find_shift(own.tokens, prompt, min_keep=max(own.n_keep, 1))
            if shift is not None and shift[2] > best_n + MIN_SHARED_PREFIX:
                keep, drop, reused = shift
                self._to_device(own)
                self._shift(own, keep, drop)
                best_n = reused
        # another cache (a known prefix, or a session with the same persona) may share more
        others = [(("prefix", k), e) for k, e in self.prefixes.items()]
        others += [(("session", k), e) for k, e in self.sessions.items() if k != session_id]
        donor_key = None
        for key, other in others:
            n = common_prefix_len(other.tokens, prompt)
            if n >= MIN_SHARED_PREFIX and (best is None or n > best_n + MIN_SHARED_PREFIX):
                best, best_n, donor_key = other, n, key
        if best is None:
            return _Entry(self._new_cache(), [], n_keep=prefix_len or 0), 0
        if best is not own:
            if donor_key[0] == "prefix":
                self.prefixes.move_to_end(donor_key[1])
            elif prefix_len is None:
                self._remember_prefix(best, best_n)  # a prefix seen twice will be seen again
            best = self._copy(best, best_n)
        self._to_device(best)
        best_n = min(best_n, len(prompt) - 1)
        self._truncate(best, best_n)
        if prefix_len is not None:
            best.n_keep = prefix_len
        return best, best_n

    def _copy(self, src: _Entry, n: int) -> _Entry:
        """A new growable cache on the engine's device holding src's first n positions."""
        cache = copy_cache(self.model, src.cache, n, self.device)
        return _Entry(cache, list(src.tokens[:n]), n_keep=min(src.n_keep, n))

    def _remember_prefix(self, entry: _Entry, n: int) -> None:
        key = tuple(entry.tokens[:n])
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            return
        snap = self._copy(entry, n)
        snap.n_keep = n
        self.prefixes[key] = snap
        while len(self.prefixes) > PREFIX_CACHE_SIZE:
            self.prefixes.popitem(last=False)

    # ---- forward passes ---------------------------------------------------------------------

    def _prefill(self, entry: _Entry, prompt: list[int], start: int, prefix_len) -> torch.Tensor:
        """Feed prompt[start:] in chunks; remember the shared prefix on the way. Returns the
        last position's logits (1, 1, vocab)."""
        logits = None
        pos = start
        while pos < len(prompt):
            end = min(pos + self.prefill_chunk, len(prompt))
            if prefix_len and pos < prefix_len < end:
                end = prefix_len  # stop exactly at the prefix so it can be snapshotted
            logits = self._forward(entry, prompt[pos:end])
            pos = end
            if prefix_len and pos == prefix_len and tuple(prompt[:prefix_len]) not in self.prefixes:
                self._remember_prefix(entry, prefix_len)
        assert logits is not None
        return logits

    def _decode_one(self, entry: _Entry, feed: list[int]) -> torch.Tensor | None:
        """Forward the sampled token (plus any draft); shift the context first when the window
        is full. Returns logits (1, len(feed), vocab), or None when nothing can be dropped (the
        pinned prefix fills the window)."""
        if len(entry.tokens) + len(feed) > self.context_window:
            feed = feed[:1]  # no drafts near the window edge
        if len(entry.tokens) + 1 > self.context_window:
            keep = max(entry.n_keep, 1)  # the first token is an attention sink: always keep it
            drop = (len(entry.tokens) - keep) // 2
            if drop < 1:
                return None
            self._shift(entry, keep, drop)
        if self._compiled is not None and len(feed) == 1:
            return self._compiled.step(entry, feed[0])
        return self._forward(entry, feed, last_only=False)

    @torch.inference_mode()
    def _forward(self, entry: _Entry, tokens: list[int], last_only: bool = True) -> torch.Tensor:
        start = entry.cache.length
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)
        logits = self.model(ids, pos, entry.cache, last_only=last_only or len(tokens) == 1)
        entry.tokens.extend(tokens)
        return logits

    def _shift(self, entry: _Entry, keep: int, drop: int) -> None:
        if not (0 <= keep and drop > 0 and keep + drop <= len(entry.tokens)):
            raise ValueError(f"shift: keep={keep}, drop={drop} do not fit a cache of {len(entry.tokens)} tokens")
        with torch.inference_mode():
            self.model.shift_cache(entry.cache, keep, drop)
        del entry.tokens[keep : keep + drop]

    # ---- cache objects and memory budget ------------------------------------------------------

    def _new_cache(self):
        return self.model.new_cache()

    def _truncate(self, entry: _Entry, n: int) -> None:
        if n < len(entry.tokens):
            entry.cache.truncate(n)
            del entry.tokens[n:]

    def _release(self, entry: _Entry, keep_data: bool = True) -> None:
        """Give the compiled decoder's working cache back if `entry` holds it."""
        if self._compiled is not None:
            self._compiled.release(entry, keep_data)

    def _to_device(self, entry: _Entry) -> None:
        if entry.on_host:
            entry.cache = entry.cache.to(self.device)
            entry.on_host = False

    def _enforce_budget(self, keep: _Entry) -> None:
        """Evict least recently used caches (prefixes first, then sessions) until the device
        total fits the budget; `keep` (the active session) always stays."""
        offload = self.device.type != "cpu"
        while self.cache_bytes() > self.kv_budget_bytes:
            victim = self._lru_victim(keep)
            if victim is None:
                log.warning("KV cache of the active session alone exceeds kv_budget_bytes=%d", self.kv_budget_bytes)
                return
            table, key, entry = victim
            keep_data = offload and table is self.sessions
            self._release(entry, keep_data)
            if keep_data:
                entry.cache = entry.cache.to("cpu")
                entry.on_host = True
            else:
                del table[key]
        while self.cache_bytes(on_host=True) > self.host_budget_bytes:
            host = next(k for k, e in self.sessions.items() if e.on_host)
            del self.sessions[host]

    def _lru_victim(self, keep: _Entry):
        for table in (self.prefixes, self.sessions):
            for key, entry in table.items():
                if entry is not keep and not entry.on_host:
                    return table, key, entry
        return None

    def _default_budget(self) -> int:
        """CPU: 1 GiB. GPU: half of the memory free after loading the model."""
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_BUDGET_FRACTION)
        return CPU_DEFAULT_BUDGET


def copy_cache(model, src, n: int, device: torch.device):
    """A growable cache on `device` holding the first n positions of `src` (any device, static or not)."""
    cache = model.new_cache(device=device)
    cache.reserve(n)
    copy_into(cache, src, n)
    return cache


def copy_into(dst, src, n: int) -> None:
    """dst's positions [0, n) := src's; dst.length = n."""
    for dst_bufs, src_bufs in ((dst.k, src.k), (dst.v, src.v)):
        for d, s in zip(dst_bufs, src_bufs, strict=True):
            d[:, :, :n] = s[:, :, :n]
    dst.length = n


class _CompiledDecode:
    """One-token decode through torch.compile over one static-capacity working cache.

    CUDA graphs need fixed buffer addresses, so there is a single working cache (its buffers
    marked static). The session being decoded adopts it (its positions are copied in once);
    the previous holder gets a growable copy back. Prefill stays eager.
    """

    def __init__(self, model, device: torch.device, capacity: int | None):
        self.model, self.device = model, device
        self.capacity = capacity or model.args.max_seq_len
        self.cache = model.new_cache(capacity=self.capacity, static=True, device=device)
        for t in self.cache.k + self.cache.v:
            torch._dynamo.mark_static_address(t)
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.fn = torch.compile(model.forward, mode=mode, dynamic=False)
        self.owner: _Entry | None = None

    def step(self, entry: _Entry, tok: int) -> torch.Tensor:
        if entry.cache is not self.cache:
            self._adopt(entry)
        pos = entry.cache.length
        self.cache.prepare(torch.tensor([pos]))  # eager bookkeeping (length), see kv_cache.py
        with torch.inference_mode():
            logits = self.fn(
                torch.tensor([[tok]], device=self.device), torch.tensor([pos], device=self.device), self.cache, True
            )
        entry.tokens.append(tok)
        return logits.clone()  # CUDA graph outputs are overwritten by the next replay

    def _adopt(self, entry: _Entry) -> None:
        if self.owner is not None:
            self.release(self.owner, keep_data=True)
        copy_into(self.cache, entry.cache, entry.cache.length)
        entry.cache, self.owner = self.cache, entry

    def release(self, entry: _Entry, keep_data: bool) -> None:
        if entry.cache is not self.cache:
            return
        if keep_data:
            entry.cache = copy_cache(self.model, self.cache, self.cache.length, self.device)
        self.owner = None
