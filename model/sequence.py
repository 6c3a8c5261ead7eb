"""`Sequence`: one request's state inside the scheduler, and what it sends back to its caller.

A sequence is its tokens (prompt, then each sampled token), how many of them have keys/values in
the pool (`computed`), and the block table holding them. Each step feeds tokens[computed:]: a
prompt in chunks, then one sampled token at a time. The caller reads `out`, a thread-safe queue
of `("token", id, logprob, top_logprobs)` items, then one `("done", reason, None, None)` or
`("error", exception, None, None)`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.batch_sampler import RowSampling
from model.sampling import LogitsProcessor, SamplingParams, make_generator

_ids = itertools.count()


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    owner: str = ""  # cache namespace: only this owner's blocks (and shared persona blocks) are reused
    session_id: str | None = None
    prefix_len: int = 0  # the pinned persona prefix: its full blocks are shared across owners
    processors: list[LogitsProcessor] = field(default_factory=list)
    should_stop: Callable[[], bool] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(init=False)
    generated: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys/values are in the pool
    table: list[int] = field(default_factory=list)  # block ids
    keys: list[bytes] = field(default_factory=list)  # chain keys of the full blocks published so far
    prompt_keys: list[bytes] = field(default_factory=list)  # keys its prompt's full blocks will have
    cached_tokens: int = 0  # prompt tokens found in the cache at admission
    admitted: int = 0  # admission order (the newest is preempted first)
    finish_reason: str | None = None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    generator: torch.Generator | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        if not self.params.greedy:
            self.generator = make_generator(self.params.seed, "cpu")

    # -- caller's side (any thread) ----------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self.should_stop is not None and self.should_stop())

    # -- scheduler's side --------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Tokens to feed before the next sample: many while prefilling, 1 while decoding."""
        return len(self.tokens) - self.computed

    def sampling(self) -> RowSampling:
        return RowSampling(self.params, self.generator, self.tokens, self.generated, self.processors)

    def emit_token(self, tok: int, logprob, top) -> None:
        self.generated.append(tok)
        self.tokens.append(tok)
        self.out.put(("token", tok, logprob, top))

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.out.put(("done", reason, None, None))

    def fail(self, exc: BaseException) -> None:
        self.finish_reason = "error"
        self.out.put(("error", exc, None, None))
