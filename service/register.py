"""The persona's Korean register (반말 / 존댓말) as the service applies it around a generation.

register_mode (persona file):  off    nothing
                               remind label replies; remind in the prompt after a drift
                               guard  remind + RegisterGuard logit processor + repair before storing
- `drifted`: did one of the last replies leave the register? Then the prompt carries a reminder.
- `guard_for`: the RegisterGuard logit processor in `guard` mode.
- `post_check`: label the finished reply (stored in its metadata, counted in /metrics) and in
  `guard` mode repair a reply that still drifted (`persona.guard.repair_reply`) before storing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from memory.types import Message

log = logging.getLogger("memento.register")

TARGETS = ("banmal", "polite")
DRIFT_WINDOW = 2  # recent replies looked at for a reminder


def target_of(persona: Any) -> str | None:
    """The register this persona must keep, or None when it does not care."""
    if getattr(persona, "register", "any") in TARGETS and getattr(persona, "register_mode", "off") != "off":
        return persona.register
    return None


def consistent(target: str, label: str) -> bool:
    return label in (target, "none")  # "none": nothing to judge (an emoji, a number)


def drifted(persona: Any, history: list[Message]) -> bool:
    from persona.guard import needs_reminder

    target = target_of(persona)
    if target is None:
        return False
    labels = [m.metadata.get("register", "none") for m in history if m.role == "assistant"]
    return needs_reminder(labels, target, window=DRIFT_WINDOW)


def guard_for(persona: Any, tokenizer: Any) -> Any | None:
    if target_of(persona) is None or persona.register_mode != "guard":
        return None
    from persona.guard import RegisterGuard

    return RegisterGuard(tokenizer, persona.register)


def post_check(
    persona: Any, text: str, metrics: Any = None, regenerate: Callable[[str], str] | None = None
) -> tuple[str, dict[str, Any]]:
    """(text to store, metadata to add). `regenerate(prefix)` returns one new sentence after `prefix`."""
    target = target_of(persona)
    if target is None:
        return text, {}
    from persona.korean import classify_reply

    label = classify_reply(text)
    meta: dict[str, Any] = {"register": label}
    if not consistent(target, label) and persona.register_mode == "guard" and regenerate is not None:
        from persona.guard import repair_reply

        result = repair_reply(regenerate, text, target)
        log.info("register repair: %s reply -> %s (%d regenerations)", label, result.label, result.repairs)
        text, meta = result.text, result.metadata
        label = result.label
    if metrics is not None:
        metrics.record_register(target, consistent(target, label))
    return text, meta
