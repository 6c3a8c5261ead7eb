"""`token_buffer`: the most recent messages whose chat-template rendering fits in `max_tokens`.

Counted exactly with the injected counter: `counter.count_messages(recent) <= max_tokens`
(the rendering includes template overhead, so the bound is conservative for the model too).
The kept part never starts with an assistant message, so strict templates (Gemma) accept it.
"""

from __future__ import annotations

from memory.strategies.base import MemoryView, StrategyDeps, fit_tail, history_before
from memory.types import Message, Session


class TokenBufferStrategy:
    name = "token_buffer"

    def __init__(self, deps: StrategyDeps, max_tokens: int) -> None:
        self.deps = deps
        self.max_tokens = max_tokens

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        history = history_before(messages, new_message)
        start = fit_tail(history, self.deps.counter, self.max_tokens, whole_exchanges=False)
        return MemoryView(recent=history[start:])

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        pass  # no derived state

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        pass
