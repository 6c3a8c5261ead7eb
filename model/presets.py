"""Sampling presets: the defaults each built-in model chats best with, chosen by measurement.

    preset_for("gemma-3-270m")    # {"temperature": ..., "min_p": ..., "dry_multiplier": ..., "stop": [...]}
    merge_sampling(preset, persona.sampling, request_fields)   # later wins; None means "not given"

The numbers come from `python -m persona.measure_quality` (README, "Conversation quality"): both
built-in models are tiny and loop without a repetition-aware sampler, so both use DRY and min-p.
gemma-3-270m is a base model that rarely writes its end-of-turn marker and, past a newline, drifts into
other languages and copies of earlier replies, so a newline ends its reply (a chat message is one line).
Any other model (a GGUF the user brings) gets no preset: OpenAI's defaults, which the request
and the persona file can still change. The service shows each model's preset in `/v1/models`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The SamplingParams fields a preset, a persona file or a request may set.
TUNABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
           "dry_sequence_breakers")

PRESETS: dict[str, dict[str, Any]] = {
    "gemma-3-270m": {
        "temperature": 0.7, "top_p": 1.0, "min_p": 0.1, "repetition_penalty": 1.0,
        "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1,
        "stop": ["\n"],
    },
    "smollm2-135m-instruct": {
        "temperature": 0.7, "top_p": 1.0, "min_p": 0.1, "repetition_penalty": 1.0,
        "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1,
    },
}


def preset_for(model_name: str) -> dict[str, Any]:
    """A copy of the model's preset ({} for a model without one)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS.get(model_name, {}).items()}


def merge_sampling(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Layers of tunable fields, later ones winning; a None value is "not given" and changes nothing.
    "stop" lists add up instead (the model's own end markers must hold whatever a client asks)."""
    out: dict[str, Any] = {}
    stops: list[str] = []
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if key == "stop":
                stops += [s for s in value if s and s not in stops]
            elif key in TUNABLE:
                out[key] = value
    if stops:
        out["stop"] = stops
    return out
