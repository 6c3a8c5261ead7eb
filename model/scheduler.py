"""`Scheduler`: continuous batching over a paged KV cache.

    sched = Scheduler(model, pool, eos_ids={2}, context_window=8192)
    sched.add(Sequence(prompt, params, owner="alice"))
    while sched.has_work():
        sched.step()                 # one forward for every running sequence

Requests join and leave the running batch at token boundaries. A step feeds every decoding
sequence its one sampled token plus at most `prefill_chunk` tokens of pending prompts (chunked
prefill), so a long new prompt delays the others by one chunk at most. Admission takes waiting
sequences round-robin across owners, mapping the longest cached prefix of each prompt (same owner,
or the shared persona prefix) instead of computing it again. When the pool runs out of blocks the
newest running sequence is preempted: its blocks go back (the full ones stay cached, so it usually
resumes from the cache) and it waits at the front of its owner's queue.

Context shift gives way to the memory layer: the service's context manager keeps every prompt
inside the window, and a reply that reaches the window ends with "length" (docs/ARCHITECTURE.md).
The scheduler is not thread-safe: `model.engine.Engine` runs it on one thread under a lock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from model.batch_sampler import sample_rows
from model.paged_attention import PagedBatch, Row
from model.paged_cache import SHARED, BlockPool, chain_keys
from model.sequence import Sequence

log = logging.getLogger(__name__)

MAX_BATCH = 16  # sequences decoding together
PREFILL_CHUNK = 256  # prompt tokens fed per step across all prefilling sequences
MAX_SESSION_RECORDS = 4096  # sessions whose last turn's blocks can be dropped by id


@dataclass
class SessionRecord:
    tokens: list[int]  # the tokens whose keys/values the session's last turn left in the pool
    keys: list[bytes]  # chain keys of its full blocks
    shared_blocks: int  # leading keys in the shared persona namespace (never dropped by the session)


class Scheduler:
    def __init__(self, model, pool: BlockPool, eos_ids, context_window: int, max_batch: int = MAX_BATCH,
                 prefill_chunk: int = PREFILL_CHUNK, decode=None) -> None:
        """`decode`: the step for decode rows (`model.fused_decode.FusedDecode`, or
        `model.decode_step.CompiledDecode`) when at most its `max_rows` decode; with
        `takes_mixed_steps` it also takes the decode rows of steps that carry prompt chunks (the
        chunks go through torch), so a row is computed the same way whatever runs beside it. None
        runs every step through torch."""
        self.model, self.pool, self.eos = model, pool, set(eos_ids)
        self.decode = decode
        self.context_window, self.max_batch, self.prefill_chunk = context_window, max_batch, prefill_chunk
        self.device = pool.k[0].device
        self.waiting: OrderedDict[str, deque[Sequence]] = OrderedDict()  # owner -> FIFO, round-robin
        self.running: list[Sequence] = []
        self.sessions: OrderedDict[str, SessionRecord] = OrderedDict()
        self._admissions = 0
        self.steps = 0

    # -- requests ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.setdefault(seq.owner, deque()).append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def drop_session(self, session_id: str) -> bool:
        """Forget the cached blocks of a session's last turn (not the shared persona blocks)."""
        rec = self.sessions.pop(session_id, None)
        if rec is None:
            return False
        for key in rec.keys[rec.shared_blocks:]:
            self.pool.forget(key)
        return True

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> None:
        self._reap_cancelled()
        self._admit()
        rows = self._schedule()
        if not rows:
            return
        self.steps += 1
        try:
            logits = self._forward(rows)
        except Exception as exc:  # a failed forward: its rows cannot continue, the others never ran
            log.exception("batched forward failed")
            for seq, _n in rows:
                self._end(seq, error=exc)
            return
        self._advance(rows, logits)

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._end(seq, "cancelled")
        for owner, q in list(self.waiting.items()):
            for seq in [s for s in q if s.cancelled]:
                q.remove(seq)
                seq.finish("cancelled")
            if not q:
                del self.waiting[owner]

    def _next_waiting(self) -> Sequence | None:
        """Round-robin across owners: take the first owner's oldest request, rotate that owner last."""
        if not self.waiting:
            return None
        owner, q = next(iter(self.waiting.items()))
        seq = q.popleft()
        del self.waiting[owner]
        if q:
            self.waiting[owner] = q  # to the back of the rotation
        return seq

    def _admit(self) -> None:
        deferred: list[Sequence] = []
        while len(self.running) < self.max_batch and self.waiting:
            seq = self._next_waiting()
            bs = self.pool.block_size
            keys = chain_keys(seq.tokens[: len(seq.tokens) - 1], bs, seq.owner, seq.prefix_len)
            table = self.pool.match(keys)  # at least one token is left to compute: its logits sample
            if len(table) < len(keys) and self._being_computed(keys[len(table)]):
                for b in table:  # the same prefix is being prefilled: wait a step and map its blocks
                    self.pool.release(b)
                deferred.append(seq)
                continue
            first_chunk = min(len(seq.tokens) - len(table) * bs, self.prefill_chunk)
            if self.pool.blocks_free < -(-first_chunk // bs) and self.running:
                for b in table:  # no room until someone finishes: wait at the front
                    self.pool.release(b)
                self._requeue_front(seq)
                break
            seq.table, seq.keys = table, keys[: len(table)]
            seq.computed = len(table) * bs
            if seq.cached_tokens == 0:  # a preempted sequence keeps the figure of its first admission
                seq.cached_tokens = seq.computed
                self.pool.queries += len(seq.prompt)
                self.pool.hits += seq.computed
            self._admissions += 1
            seq.admitted = self._admissions
            seq.prompt_keys = keys
            self.running.append(seq)
        for seq in reversed(deferred):
            self._requeue_front(seq)

    def _being_computed(self, key: bytes) -> bool:
        """Whether a running sequence's prefill will publish `key` (n samples of one prompt)."""
        return any(s.pending > 1 and key in s.prompt_keys[len(s.keys):] for s in self.running)

    def _requeue_front(self, seq: Sequence) -> None:
        q = self.waiting.pop(seq.owner, deque())
        q.appendleft(seq)
        self.waiting[seq.owner] = q
        self.waiting.move_to_end(seq.owner, last=False)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) for this step, with blocks reserved for them."""
        plan = [(s, 1) for s in self.running if s.pending == 1]
        budget = self.prefill_chunk
        for s in self.running:
            if s.pending > 1 and budget > 0:
                n = min(s.pending, budget)
                plan.append((s, n))
                budget -= n
        rows: list[tuple[Sequence, int]] = []
        for seq, n in plan:
            if seq in self.running and self._reserve(seq, seq.computed + n):
                rows.append((seq, n))
        return [(s, n) for s, n in rows if s in self.running]  # minus those preempted meanwhile

    def _reserve(self, seq: Sequence, positions: int) -> bool:
        bs = self.pool.block_size
        while len(seq.table) * bs < positions:
            b = self.pool.allocate()
            if b is None:
                victim = max((s for s in self.running if s is not seq), key=lambda s: s.admitted, default=None)
                if victim is None:
                    self._end(seq, error=MemoryError(
                        f"KV cache full: {positions} positions need {-(-positions // bs)} blocks but the pool has "
                        f"{self.pool.num_blocks - 1}; raise kv_budget_bytes (MEMENTO_KV_BUDGET) or shorten the prompt"))
                    return False
                self._preempt(victim)
                continue
            seq.table.append(b)
        return True

    def _preempt(self, seq: Sequence) -> None:
        log.info("preempting sequence %d (%d tokens) for KV blocks", seq.id, len(seq.tokens))
        self.running.remove(seq)
        for b in seq.table:
            self.pool.release(b)
        seq.table, seq.keys, seq.computed = [], [], 0
        self._requeue_front(seq)

    @torch.inference_mode()
    def _forward(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Logits of the rows that sample this step, in row order."""
        dec = self.decode
        decoding = [(s, n) for s, n in rows if _decodes(s, n)]
        usable = dec is not None and dec.failed is None and 0 < len(decoding) <= dec.max_rows
        if usable and (len(decoding) == len(rows) or dec.takes_mixed_steps):
            try:
                dec_logits = dec([s.tokens[s.computed] for s, _ in decoding], [s.table for s, _ in decoding],
                                 [s.computed for s, _ in decoding])
            except Exception as exc:  # a compiler problem must not take the service down: go eager
                log.warning("the %s failed (%s); decoding eagerly from now on", type(dec).__name__, exc)
                dec.failed = exc
            else:
                if len(decoding) == len(rows):
                    return dec_logits
                return self._merge(rows, dec_logits, self._torch_forward([(s, n) for s, n in rows if not _decodes(s, n)]))
        return self._torch_forward(rows)

    @staticmethod
    def _merge(rows: list[tuple[Sequence, int]], dec_logits: torch.Tensor, pre_logits: torch.Tensor) -> torch.Tensor:
        """Decode rows' logits and prompt chunks' (those that end their prompt) back in row order."""
        out, d, p = [], 0, 0
        for seq, n in rows:
            if _decodes(seq, n):
                out.append(dec_logits[d])
                d += 1
            elif seq.computed + n == len(seq.tokens):
                out.append(pre_logits[p])
                p += 1
        return torch.stack(out) if out else dec_logits[:0]

    def _torch_forward(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        ids = [t for seq, n in rows for t in seq.tokens[seq.computed : seq.computed + n]]
        batch = PagedBatch(self.pool, [Row(s.table, s.computed, n, s.computed + n == len(s.tokens))
                                       for s, n in rows], self.model.args)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(tokens, batch.positions, batch)[0]  # (rows wanting logits, vocab)

    def _advance(self, rows: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        sampling = []
        for seq, n in rows:
            seq.computed += n
            self._publish(seq)
            if seq.computed == len(seq.tokens):
                sampling.append(seq)
        for seq, pick in zip(sampling, self._sample(sampling, logits), strict=True):
            if isinstance(pick, BaseException):
                self._end(seq, error=pick)
                continue
            tok, lp, top = pick
            if tok in self.eos:
                self._end(seq, "stop")
                continue
            seq.emit_token(tok, lp, top)
            if len(seq.generated) >= seq.params.max_tokens or len(seq.tokens) >= self.context_window:
                self._end(seq, "length")

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list:
        try:
            return sample_rows(logits, [s.sampling() for s in seqs])
        except Exception:  # a processor failed: find whose, so only that request fails
            out = []
            for i, s in enumerate(seqs):
                try:
                    out.append(sample_rows(logits[i : i + 1], [s.sampling()])[0])
                except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                    out.append(exc)
            return out

    def _publish(self, seq: Sequence) -> None:
        """Index the sequence's newly completed blocks so later prompts can map them."""
        bs, full = self.pool.block_size, seq.computed // self.pool.block_size
        if full <= len(seq.keys):
            return
        parent = seq.keys[-1] if seq.keys else b""
        new = chain_keys(seq.tokens[: full * bs], bs, seq.owner, seq.prefix_len, len(seq.keys), parent)
        for i, key in enumerate(new, start=len(seq.keys)):
            self.pool.publish(seq.table[i], key)
        seq.keys.extend(new)

    def _end(self, seq: Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.session_id is not None and error is None:
            self._remember(seq)
        for b in seq.table:
            self.pool.release(b)
        seq.table = []
        if error is not None:
            seq.fail(error)
        else:
            seq.finish(reason)

    def _remember(self, seq: Sequence) -> None:
        bs = self.pool.block_size
        shared = min(len(seq.keys), seq.prefix_len // bs)
        self.sessions[seq.session_id] = SessionRecord(seq.tokens[: seq.computed], list(seq.keys), shared)
        self.sessions.move_to_end(seq.session_id)
        while len(self.sessions) > MAX_SESSION_RECORDS:
            self.sessions.popitem(last=False)


def _decodes(seq: Sequence, n: int) -> bool:
    """The row feeds its one last token and samples after it (a prompt's last chunk of one token
    too; not a one-token chunk cut short by the prefill budget, which samples nothing)."""
    return n == 1 and seq.computed + 1 == len(seq.tokens)


__all__ = ["Scheduler", "SessionRecord", "SHARED"]
