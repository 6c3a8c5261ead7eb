"""The one register policy: what a persona's `register` / `register_mode` asks for around a reply.

register_mode:  off     nothing
                remind  label replies; a reminder in the prompt after a drift
                guard   remind + the RegisterGuard logit processor + repair before storing

    target_of(persona)              # "banmal" | "polite" | None (nothing to keep)
    drifted(persona, labels)        # remind in the prompt? (labels of the recent replies, oldest first)
    guard_for(persona, tokenizer)   # RegisterGuard in guard mode, else None
    check(persona, text, regenerate=None) -> Checked   # label, and in guard mode repair

The service (service/register.py) calls these and adds what is its own: reading labels from the
stored transcript and counting replies in /metrics. persona/measure_register.py uses the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TARGETS = ("banmal", "polite")
DRIFT_WINDOW = 2  # recent replies looked at for a reminder


def target_of(persona: Any) -> str | None:
    """The register this persona must keep, or None when it does not care."""
    if getattr(persona, "register", "any") in TARGETS and getattr(persona, "register_mode", "off") != "off":
        return persona.register
    return None


def consistent(target: str, label: str) -> bool:
    return label in (target, "none")  # "none": nothing to judge (an emoji, a number)


def drifted(persona: Any, recent_labels: Sequence[str], window: int = DRIFT_WINDOW) -> bool:
    """True when one of the last `window` reply labels left the persona's register (remind/guard)."""
    from persona.guard import needs_reminder

    target = target_of(persona)
    return target is not None and needs_reminder(recent_labels, target, window=window)


def guards(persona: Any) -> bool:
    """Whether this persona runs the logit guard and the repair (register_mode "guard")."""
    return target_of(persona) is not None and persona.register_mode == "guard"


def guard_for(persona: Any, tokenizer: Any) -> Any | None:
    """The RegisterGuard logit processor in guard mode, else None (imports torch only then)."""
    if not guards(persona):
        return None
    from persona.guard import RegisterGuard

    return RegisterGuard(tokenizer, persona.register)


@dataclass
class Checked:
    text: str  # what to store
    metadata: dict[str, Any] = field(default_factory=dict)  # register label (+ repairs)
    target: str | None = None  # None: the persona keeps no register (nothing was checked)
    label: str | None = None  # of the final text
    first_label: str | None = None  # of the reply as generated

    @property
    def consistent(self) -> bool:
        return self.target is None or consistent(self.target, self.label or "none")


def check(persona: Any, text: str, regenerate: Callable[[str], str] | None = None, **repair: Any) -> Checked:
    """Label the finished reply; in guard mode repair a drifted one with `regenerate(prefix)` (one new
    sentence after `prefix`, see persona.guard.repair_reply; `repair` passes its options on)."""
    target = target_of(persona)
    if target is None:
        return Checked(text)
    from persona.korean import classify_reply

    label = classify_reply(text)
    out = Checked(text, {"register": label}, target, label, label)
    if not consistent(target, label) and guards(persona) and regenerate is not None:
        from persona.guard import repair_reply

        result = repair_reply(regenerate, text, target, **repair)
        out.text, out.metadata, out.label = result.text, result.metadata, result.label
    return out
