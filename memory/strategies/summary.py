"""`summary`: a running summary written by the local model; no verbatim turns.

`RunningSummary` is the persisted, incremental summary shared with `summary_buffer`:
state `{"text", "count", "first_id", "last_id"}` under a per-strategy key says the summary
covers `messages[:count]` (ids `first_id`..`last_id`). Folding calls the summarizer exactly once
with only the messages not yet covered, so a restart (a new strategy object reading the state)
recomputes nothing, and `rebuild` recomputes from the original transcript.

One fold at a time per session across every API process: the fold holds a lease in the store
(`fold:<session>:<key>`; a second folder skips, the next turn catches up) and writes with
`cas_state` over the state it read, so a fold whose lease expired mid-call (a stalled process)
is discarded instead of folding the same messages twice.

Stale summary: `after_turn` runs after the reply has streamed. Until it has, `view` returns the
messages the summary does not cover yet verbatim in `recent` (the context-window manager
drops the oldest of them if the window is full), so nothing is silently missing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from memory.leases import Lease
from memory.store import StoreError
from memory.strategies.base import MemoryView, StrategyDeps, Summarizer, history_before, parse_state_range
from memory.types import Message, Session

log = logging.getLogger("memento.memory")
REBUILD_WAIT_S = 30.0  # a rebuild waits this long for a running fold to finish


class RunningSummary:
    def __init__(self, deps: StrategyDeps, key: str) -> None:
        if deps.summarizer is None:
            raise ValueError(f"memory strategy {key!r} needs a summarizer (StrategyDeps.summarizer is None)")
        self.store = deps.store
        self.summarizer: Summarizer = deps.summarizer
        self.key = key

    def load(self, session_id: str, messages: list[Message]) -> tuple[str, int]:
        """(summary text, number of leading messages it covers)."""
        state = self.store.get_state(session_id, self.key)
        count = parse_state_range(state, messages)
        return (state or {}).get("text", "") if count else "", count

    def fold(self, session_id: str, messages: list[Message], upto: int) -> None:
        """Extend the summary to cover `messages[:upto]`, summarising only the new part (one call)."""
        lease = Lease.acquire(self.store, self._lease_name(session_id))
        if lease is None:
            return  # another process is folding this session right now
        try:
            state = self.store.get_state(session_id, self.key)
            count = parse_state_range(state, messages)
            if upto <= count:
                return
            text = (state or {}).get("text", "") if count else ""
            self._save(session_id, messages, self.summarizer(text, messages[count:upto]), upto, expected=state)
            log.info("summary %s of %s folded [%d:%d]", self.key, session_id, count, upto)
        finally:
            lease.release()

    def rebuild(self, session_id: str, messages: list[Message], upto: int) -> None:
        """Recompute from the originals, ignoring the persisted summary (waits for a running fold)."""
        deadline = time.monotonic() + REBUILD_WAIT_S
        while (lease := Lease.acquire(self.store, self._lease_name(session_id))) is None:
            if time.monotonic() > deadline:
                raise StoreError(f"session {session_id!r} stayed busy folding for {REBUILD_WAIT_S:g} s; retry")
            time.sleep(0.1)
        try:
            text = self.summarizer("", messages[:upto]) if upto else ""
            self._save(session_id, messages, text, upto, expected=self.store.get_state(session_id, self.key))
        finally:
            lease.release()

    def _lease_name(self, session_id: str) -> str:
        return f"fold:{session_id}:{self.key}"

    def _save(
        self, session_id: str, messages: list[Message], text: str, upto: int, expected: dict[str, Any] | None
    ) -> None:
        state = {"text": text, "count": upto, "first_id": None, "last_id": None}
        if upto:
            state.update(first_id=messages[0].id, last_id=messages[upto - 1].id)
        if not self.store.cas_state(session_id, self.key, expected, state):
            # our lease expired while the model summarised and someone else folded: theirs stands
            log.warning("summary %s of %s changed while folding: this fold is discarded", self.key, session_id)


class SummaryStrategy:
    name = "summary"

    def __init__(self, deps: StrategyDeps) -> None:
        self.deps = deps
        self.running = RunningSummary(deps, key="summary")

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        history = history_before(messages, new_message)
        text, count = self.running.load(session.id, history)
        return MemoryView(summary=text or None, recent=history[count:])

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        self.running.fold(session.id, messages, len(messages))

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        messages = self.deps.store.list_messages(session.id) if messages is None else messages
        self.running.rebuild(session.id, messages, len(messages))
