"""Around each persona turn: the sampling it runs with, and the check before its reply is stored.

- `turn_sampling`: the model's preset (model/presets.py, shown in `/v1/models`) under the persona
  file's `sampling` under the request's own fields, plus the carriers' stop strings, so an echo of
  the "[System note: ...]" ends the generation before it is streamed.
- `settle_reply`: persona.quality.settle() on the finished reply: a leaked instruction is cut, a
  degenerate reply (a looping phrase, a copy of an earlier reply, another script) is regenerated
  at most `RETRIES` times with a new seed while the client is still there; what is stored never
  echoes the prompt. The metadata says what happened ("leak_cut", "quality_regenerations", ...).
The register post-check (service/register.py) runs after this, on the settled text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from model.presets import merge_sampling, preset_for
from persona import quality

log = logging.getLogger("memento.quality")

RETRIES = 2  # whole-reply regenerations for a degenerate reply (each costs a full generation)
TUNED = ("temperature", "top_p")  # Sampling's own fields; the other tunables travel in `extra`
OPENAI_DEFAULTS = {"temperature": 0.7, "top_p": 1.0}


def persona_sampling(persona: Any) -> dict[str, Any]:
    own = getattr(persona, "sampling", None)
    return own.model_dump(exclude_none=True) if own is not None else {}


def turn_sampling(sampling: Any, model_name: str, persona: Any, persona_prompt: bool) -> Any:
    """A copy of the request's `Sampling` with the layers filled in (see module doc). The carrier
    stops only where the prompt carries the persona's notes (memory mode or a named persona); no
    preset under a grammar (tool calls, JSON: its own reply-only repetition penalty, service/routers/chat.py)."""
    given = {"temperature": sampling.temperature, "top_p": sampling.top_p, **sampling.extra}
    preset = preset_for(model_name) if sampling.processors is None else {}
    merged = merge_sampling(OPENAI_DEFAULTS, preset, persona_sampling(persona), given)
    stops = merged.pop("stop", [])
    if persona_prompt:
        stops += [s for s in quality.carrier_stops(persona) if s not in stops]
    extra = {**sampling.extra, **{k: v for k, v in merged.items() if k not in TUNED}}  # logprobs, bias kept
    return replace(sampling, temperature=merged["temperature"], top_p=merged["top_p"], extra=extra,
                   stop=list(sampling.stop) + [s for s in stops if s not in sampling.stop])


def settle_reply(rules: quality.ReplyRules, text: str, regenerate: Callable[[int], str] | None,
                 should_stop: Callable[[], bool] | None = None, retries: int = RETRIES) -> tuple[str, dict[str, Any]]:
    """(the text to store, metadata to add). `regenerate(attempt)` returns a whole new reply; it is
    not called once `should_stop()` (the client left: what was generated is kept, leak cut)."""

    def fresh(attempt: int) -> str:
        if regenerate is None or (should_stop is not None and should_stop()):
            return ""
        return regenerate(attempt)

    settled = quality.settle(text, rules, fresh if regenerate is not None else None, retries)
    if settled.metadata:
        log.info("reply check: %s", settled.metadata)
    return settled.text, settled.metadata
