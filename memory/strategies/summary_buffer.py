"""`summary_buffer`: recent exchanges verbatim within `max_tokens` + a running summary of older ones.

After each turn, whole exchanges that no longer fit the verbatim budget ("overflow") are folded
into the running summary with one summarizer call; the summary covers `messages[:count]` and the
verbatim part is everything after it (see `summary.py` for state, restart and staleness).
"""

from __future__ import annotations

from memory.strategies.base import MemoryView, StrategyDeps, fit_tail, history_before
from memory.strategies.summary import RunningSummary
from memory.types import Message, Session


class SummaryBufferStrategy:
    name = "summary_buffer"

    def __init__(self, deps: StrategyDeps, max_tokens: int) -> None:
        self.deps = deps
        self.max_tokens = max_tokens
        self.running = RunningSummary(deps, key="summary_buffer")

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        history = history_before(messages, new_message)
        text, count = self.running.load(session.id, history)
        # when after_turn has not caught up, overflowed turns are still here verbatim
        return MemoryView(summary=text or None, recent=history[count:])

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        _, count = self.running.load(session.id, messages)
        upto = count + self._overflow(messages[count:])
        if upto > count:
            self.running.fold(session.id, messages, upto)

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        messages = self.deps.store.list_messages(session.id) if messages is None else messages
        self.running.rebuild(session.id, messages, self._overflow(messages))

    def _overflow(self, uncovered: list[Message]) -> int:
        """How many leading messages of `uncovered` do not fit the verbatim budget (whole exchanges)."""
        return fit_tail(uncovered, self.deps.counter, self.max_tokens, whole_exchanges=True)
