"""`buffer`: the whole transcript, verbatim. Only the context-window manager trims it (oldest first)."""

from __future__ import annotations

from memory.strategies.base import MemoryView, StrategyDeps, history_before
from memory.types import Message, Session


class BufferStrategy:
    name = "buffer"

    def __init__(self, deps: StrategyDeps) -> None:
        self.deps = deps

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        return MemoryView(recent=list(history_before(messages, new_message)))

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        pass  # no derived state

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        pass
