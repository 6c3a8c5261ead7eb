"""`window`: the last `turns` user+assistant exchanges, verbatim."""

from __future__ import annotations

from memory.strategies.base import MemoryView, StrategyDeps, history_before, last_exchanges
from memory.types import Message, Session


class WindowStrategy:
    name = "window"

    def __init__(self, deps: StrategyDeps, turns: int) -> None:
        self.deps = deps
        self.turns = turns

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        return MemoryView(recent=last_exchanges(history_before(messages, new_message), self.turns))

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        pass  # no derived state

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        pass
