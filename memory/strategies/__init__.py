"""Memory strategies: the registry and the factory; configuration lives in `memory.config`.

    cfg = validate_memory_config({"strategy": "window", "turns": 8})   # defaults filled in
    strategy = build_strategy(cfg, StrategyDeps(store, counter, summarizer, vector))
    view = strategy.view(session, messages, new_message)

Names and parameters are the public contract (DESIGN.md): units are in the names
(`turns` = user+assistant exchanges, `max_tokens` = the model's tokens, `k` = exchanges).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memory.config import (
    DEFAULT_STRATEGY,
    MemoryConfigError,
    parse_memory_config,
    strategy_params,
    validate_memory_config,
)
from memory.strategies.base import (
    MemoryStrategy,
    MemoryView,
    StrategyDeps,
    Summarizer,
    TokenCounter,
    group_exchanges,
)
from memory.strategies.buffer import BufferStrategy
from memory.strategies.long_term import LongTermStrategy
from memory.strategies.summary import SummaryStrategy
from memory.strategies.summary_buffer import SummaryBufferStrategy
from memory.strategies.token_buffer import TokenBufferStrategy
from memory.strategies.vector import VectorStrategy
from memory.strategies.window import WindowStrategy

# name -> class; each class takes (deps, **its config's parameters)
STRATEGIES: dict[str, Callable[..., MemoryStrategy]] = {
    "buffer": BufferStrategy,
    "window": WindowStrategy,
    "token_buffer": TokenBufferStrategy,
    "summary": SummaryStrategy,
    "summary_buffer": SummaryBufferStrategy,
    "vector": VectorStrategy,
    "long_term": LongTermStrategy,
}


def build_strategy(config: Any, deps: StrategyDeps) -> MemoryStrategy:
    """A strategy instance for a (validated or raw) memory config."""
    cfg = parse_memory_config(config)
    return STRATEGIES[cfg.strategy](deps, **strategy_params(cfg))


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
