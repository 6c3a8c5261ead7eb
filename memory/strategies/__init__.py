"""Memory strategies: the registry, config validation and the factory.

    cfg = validate_memory_config({"strategy": "window", "turns": 8})   # defaults filled in
    strategy = build_strategy(cfg, StrategyDeps(store, counter, summarizer, vector))
    view = strategy.view(session, messages, new_message)

Names and parameters are the public contract (DESIGN.md): units are in the names
(`turns` = user+assistant exchanges, `max_tokens` = the model's tokens, `k` = exchanges).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from memory.strategies.base import (
    MemoryStrategy,
    MemoryView,
    StrategyDeps,
    Summarizer,
    TokenCounter,
    group_exchanges,
)
from memory.strategies.buffer import BufferStrategy
from memory.strategies.summary import SummaryStrategy
from memory.strategies.summary_buffer import SummaryBufferStrategy
from memory.strategies.token_buffer import TokenBufferStrategy
from memory.strategies.vector import VectorStrategy
from memory.strategies.window import WindowStrategy

DEFAULT_STRATEGY = "summary_buffer"

# name -> (class, {parameter: default})
STRATEGIES: dict[str, tuple[Callable[..., MemoryStrategy], dict[str, Any]]] = {
    "buffer": (BufferStrategy, {}),
    "window": (WindowStrategy, {"turns": 8}),
    "token_buffer": (TokenBufferStrategy, {"max_tokens": 1024}),
    "summary": (SummaryStrategy, {}),
    "summary_buffer": (SummaryBufferStrategy, {"max_tokens": 1024}),
    "vector": (VectorStrategy, {"k": 4, "turns": 4, "scope": "session"}),
}
SCOPES = ("session", "user")


class MemoryConfigError(ValueError):
    """Invalid memory configuration; `param` names the field (e.g. "memory.turns")."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def validate_memory_config(config: dict[str, Any] | str | None) -> dict[str, Any]:
    """Checked and completed config: `{"strategy": name, **parameters with defaults}`.

    Accepts a dict, a bare strategy name ("window") or its JSON text (MEMENTO_MEMORY); None means
    the default strategy.
    """
    if config is None:
        config = {"strategy": DEFAULT_STRATEGY}
    if isinstance(config, str):
        config = _parse_text(config)
    if not isinstance(config, dict):
        raise MemoryConfigError("memory must be an object like {\"strategy\": \"window\", \"turns\": 8}", "memory")
    name = config.get("strategy")
    if name not in STRATEGIES:
        raise MemoryConfigError(
            f"memory.strategy must be one of {', '.join(STRATEGIES)} (got {name!r})", "memory.strategy"
        )
    defaults = STRATEGIES[name][1]
    unknown = sorted(set(config) - set(defaults) - {"strategy"})
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise MemoryConfigError(
            f"memory.{unknown[0]} is not a parameter of strategy {name!r} (allowed: {allowed})",
            f"memory.{unknown[0]}",
        )
    out: dict[str, Any] = {"strategy": name}
    for param, default in defaults.items():
        value = config.get(param, default)
        if param == "scope":
            if value not in SCOPES:
                raise MemoryConfigError(f"memory.scope must be 'session' or 'user' (got {value!r})", "memory.scope")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MemoryConfigError(f"memory.{param} must be an integer >= 1 (got {value!r})", f"memory.{param}")
        out[param] = value
    return out


def _parse_text(text: str) -> Any:
    text = text.strip()
    if not text.startswith("{"):
        return {"strategy": text}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MemoryConfigError(f"memory is not valid JSON: {e}", "memory") from e


def build_strategy(config: dict[str, Any] | str | None, deps: StrategyDeps) -> MemoryStrategy:
    """A strategy instance for a (validated or raw) memory config."""
    cfg = validate_memory_config(config)
    cls, _ = STRATEGIES[cfg["strategy"]]
    params = {k: v for k, v in cfg.items() if k != "strategy"}
    return cls(deps, **params)


__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "MemoryConfigError",
    "MemoryStrategy",
    "MemoryView",
    "StrategyDeps",
    "Summarizer",
    "TokenCounter",
    "build_strategy",
    "group_exchanges",
    "validate_memory_config",
]
