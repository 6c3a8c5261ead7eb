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


def post_check(
    persona: Any, text: str, metrics: Any = None, regenerate: Callable[[str], str] | None = None
) -> tuple[str, dict[str, Any]]:
    """(text to store, metadata to add). `regenerate(prefix)` returns one new sentence after `prefix`."""
    checked = register_policy.check(persona, text, regenerate)
    if checked.target is None:
        return text, {}
    if checked.first_label != checked.label or "register_repairs" in checked.metadata:
        log.info("register repair: %s reply -> %s (%s regenerations)", checked.first_label, checked.label,
                 checked.metadata.get("register_repairs", 0))
    if metrics is not None:
        metrics.record_register(checked.target, checked.consistent)
    return checked.text, checked.metadata
