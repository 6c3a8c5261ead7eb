"""The persona's Korean register (반말 / 존댓말) as the service applies it around a generation.

register_mode (persona file):  off    nothing
                               remind label replies; remind in the prompt after a drift
                               guard  remind + RegisterGuard logit processor + repair before storing
- `drifted`: did one of the last replies leave the register? Then the prompt carries a reminder.
- `guard_for`: the RegisterGuard logit processor in `guard` mode.
- `post_check`: label the finished reply (stored in its metadata, counted in /metrics) and in
  `guard` mode repair a reply that still drifted (`persona.guard.repair_reply`) before storing.
The policy itself (targets, drift, guard, label and repair) is `persona/register_policy.py`; this
module adds what is the service's: labels read from the stored transcript, and /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from memory.types import Message
from persona import register_policy
from persona.register_policy import DRIFT_WINDOW, TARGETS, consistent, guard_for, target_of  # noqa: F401

log = logging.getLogger("memento.register")


def drifted(persona: Any, history: list[Message]) -> bool:
    labels = [m.metadata.get("register", "none") for m in history if m.role == "assistant"]
    return register_policy.drifted(persona, labels)


REPAIR_BUDGET = 6  # regenerations per reply, all sentences together (a long drifted reply is not 2 x N runs)


class RepairBudget:
    """`regenerate` that stops calling the model once the client is gone or the budget is spent.

    Past either, it returns "" so repair_reply falls back to its rule rewrite (no generation):
    the reply is still stored in register, just without further model runs."""

    def __init__(self, regenerate: Callable[[str], str], should_stop: Callable[[], bool] | None, budget: int):
        self.regenerate = regenerate
        self.should_stop = should_stop or (lambda: False)
        self.left = budget
        self.calls = 0
        self.stopped = False

    def __call__(self, prefix: str) -> str:
        if self.left <= 0 or self.should_stop():
            self.stopped = True
            return ""
        self.left -= 1
        self.calls += 1
        return self.regenerate(prefix)


def post_check(
    persona: Any, text: str, metrics: Any = None, regenerate: Callable[[str], str] | None = None,
    should_stop: Callable[[], bool] | None = None, budget: int = REPAIR_BUDGET,
) -> tuple[str, dict[str, Any]]:
    """(text to store, metadata to add). `regenerate(prefix)` returns one new sentence after `prefix`;
    it runs at most `budget` times and not at all once `should_stop()` (the job was cancelled)."""
    limited = RepairBudget(regenerate, should_stop, budget) if regenerate is not None else None
    checked = register_policy.check(persona, text, limited)
    if limited is not None and "register_repairs" in checked.metadata:
        checked.metadata["register_repairs"] = limited.calls  # model runs, not tries (a refused try is none)
        if limited.stopped:
            checked.metadata["register_repair_cut"] = "cancelled" if limited.left > 0 else "budget"
    if checked.target is None:
        return text, {}
    if checked.first_label != checked.label or "register_repairs" in checked.metadata:
        log.info("register repair: %s reply -> %s (%s regenerations)", checked.first_label, checked.label,
                 checked.metadata.get("register_repairs", 0))
    if metrics is not None:
        metrics.record_register(checked.target, checked.consistent)
    return checked.text, checked.metadata
