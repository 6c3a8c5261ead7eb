"""The one definition of a session's memory configuration: a pydantic discriminated union.

Settings (`MEMENTO_MEMORY`), the API schemas (`memory` in `POST/PATCH /v1/sessions`),
`build_strategy` and `Conversations.check_memory` all validate through this module, so a
parameter, its default and its bounds are written once:

    cfg = parse_memory_config('{"strategy": "window", "turns": 8}')   # -> WindowConfig
    validate_memory_config({"strategy": "vector", "k": 2})            # -> completed dict
    MemoryConfig                                                       # the union, for schemas

Units are in the names (`turns` = user+assistant exchanges, `max_tokens` = the model's tokens,
`k` = exchanges, `max_facts` = facts). Upper bounds keep one session from asking for work or
memory no context window can use.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

DEFAULT_STRATEGY = "summary_buffer"
MAX_TURNS = 256  # exchanges kept verbatim; more never fits a real context window
MAX_TOKENS = 131_072  # the largest context window of any supported model
MAX_K = 64  # retrieved exchanges per turn
MAX_FACTS = 64  # facts shown per turn

Turns = Annotated[int, Field(ge=1, le=MAX_TURNS, strict=True, description="user+assistant exchanges")]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS, strict=True, description="the model's tokens")]
K = Annotated[int, Field(ge=1, le=MAX_K, strict=True, description="retrieved exchanges")]
Scope = Literal["session", "user"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


class BufferConfig(_Config):
    strategy: Literal["buffer"]


class WindowConfig(_Config):
    strategy: Literal["window"]
    turns: Turns = 8


class TokenBufferConfig(_Config):
    strategy: Literal["token_buffer"]
    max_tokens: Tokens = 1024


class SummaryConfig(_Config):
    strategy: Literal["summary"]


class SummaryBufferConfig(_Config):
    strategy: Literal["summary_buffer"]
    max_tokens: Tokens = 1024


class VectorConfig(_Config):
    strategy: Literal["vector"]
    k: K = 4
    turns: Turns = 4
    scope: Scope = "session"


class LongTermConfig(_Config):
    """Core blocks + current facts + hybrid (dense + BM25) retrieval + the last `turns` exchanges."""

    strategy: Literal["long_term"]
    k: K = 4
    turns: Turns = 4
    scope: Scope = "session"
    max_facts: Annotated[int, Field(ge=0, le=MAX_FACTS, strict=True, description="facts shown per turn")] = 12


MemoryConfig = Annotated[
    Union[  # noqa: UP007 (pydantic needs the Union spelled out inside Annotated on 3.10)
        BufferConfig,
        WindowConfig,
        TokenBufferConfig,
        SummaryConfig,
        SummaryBufferConfig,
        VectorConfig,
        LongTermConfig,
    ],
    Field(discriminator="strategy"),
]
CONFIG_CLASSES: dict[str, type[_Config]] = {
    cls.model_fields["strategy"].annotation.__args__[0]: cls  # type: ignore[union-attr]
    for cls in (BufferConfig, WindowConfig, TokenBufferConfig, SummaryConfig, SummaryBufferConfig, VectorConfig,
                LongTermConfig)
}
STRATEGY_NAMES = tuple(CONFIG_CLASSES)
_ADAPTER: TypeAdapter[Any] = TypeAdapter(MemoryConfig)


class MemoryConfigError(ValueError):
    """Invalid memory configuration; `param` names the field (e.g. "memory.turns")."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_memory_config(config: dict[str, Any] | str | BaseModel | None, source: str = "memory") -> Any:
    """The validated config model. Accepts a dict, a model, a bare name ("window") or its JSON
    text (MEMENTO_MEMORY); None means the default strategy. Raises MemoryConfigError."""
    if config is None:
        config = {"strategy": DEFAULT_STRATEGY}
    if isinstance(config, BaseModel):
        config = config.model_dump()
    if isinstance(config, str):
        config = _parse_text(config, source)
    if not isinstance(config, dict):
        raise MemoryConfigError(
            f'{source} must be an object like {{"strategy": "window", "turns": 8}} (got {type(config).__name__})',
            "memory",
        )
    name = config.get("strategy")
    if name not in CONFIG_CLASSES:
        raise MemoryConfigError(
            f"{source}.strategy must be one of {', '.join(STRATEGY_NAMES)} (got {name!r})", "memory.strategy"
        )
    try:
        return _ADAPTER.validate_python(config)
    except ValidationError as exc:
        raise _config_error(exc, name, source) from exc


def validate_memory_config(config: dict[str, Any] | str | BaseModel | None, source: str = "memory") -> dict[str, Any]:
    """Checked and completed config as a plain dict: `{"strategy": name, **parameters with defaults}`."""
    return parse_memory_config(config, source).model_dump()


def strategy_params(config: Any) -> dict[str, Any]:
    """The keyword arguments of a strategy's constructor: the config without its tag."""
    return {k: v for k, v in config.model_dump().items() if k != "strategy"}


def _parse_text(text: str, source: str) -> Any:
    text = text.strip()
    if not text.startswith("{"):
        return {"strategy": text}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MemoryConfigError(
            f"{source} is not valid JSON ({e.msg}); e.g. '{{\"strategy\":\"window\",\"turns\":8}}'", "memory"
        ) from e


def _config_error(exc: ValidationError, name: str, source: str) -> MemoryConfigError:
    """The first problem as `memory.<field>: <reason>`, with the allowed parameters for unknown ones."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"][1:]]  # loc[0] is the union's tag (the strategy name)
    field = loc[0] if loc else "strategy"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(p for p in CONFIG_CLASSES[name].model_fields if p != "strategy") or "none"
        msg = f"{source}.{field} is not a parameter of strategy {name!r} (allowed: {allowed})"
    else:
        msg = f"{source}.{field}: {first['msg']} (got {first.get('input')!r})"
    return MemoryConfigError(msg, f"memory.{field}")
