"""One validated `Settings` for the service: env prefix `MEMENTO_`, optional `--config FILE`.

Precedence, highest first: keyword arguments (the CLI's flags), `MEMENTO_*` environment
variables, the config file (YAML, TOML or JSON; keys `model` or `MEMENTO_MODEL` alike), defaults.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML config files need 3.11+
    tomllib = None  # type: ignore[assignment]

LOCAL_USER = "local"  # the owner of everything when no API keys are configured

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("memento_config_file", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMENTO_", extra="forbid", validate_default=True)

    # --- the public keys (DESIGN.md) ---
    model: str = "smollm2-135m-instruct"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    data_dir: Path = Path("./data")
    store_url: str = ""  # empty: sqlite:///<data_dir>/memento.db
    chroma_url: str | None = None  # None: embedded Chroma under <data_dir>/chroma
    embeddings: Literal["use-multilingual-v3", "all-minilm-l6-v2"] = "use-multilingual-v3"
    memory: Annotated[dict[str, Any], NoDecode] = Field(default_factory=lambda: {"strategy": "summary_buffer"})
    persona: str = "assistant"
    persona_dir: Path | None = None
    api_keys: Annotated[SecretStr | None, NoDecode] = None  # "key1:alice,key2:bob:admin"; SecretStr keeps it out of logs
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host header values accepted beyond the loopback names (comma-separated)")
    engine_url: str | None = Field(None, description="an OpenAI-compatible engine, http://host:port/v1; no local weights")
    engine_key: SecretStr | None = None  # sent as `Authorization: Bearer` to the engine
    engine_model: str | None = None  # None: the engine's first /v1/models entry
    context_window: int | None = Field(None, ge=64, description="override the window from the engine or the model")

    # --- extras (ours) ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    queue_size: int = Field(16, ge=1, description="requests waiting for the model beyond this get 429")
    max_running: int = Field(8, ge=1, le=64, description="requests generating at once (the engine's batch)")
    owner_running: int | None = Field(None, ge=1, description="per user: requests running at once; None: half of max_running")
    owner_waiting: int | None = Field(None, ge=1, description="per user: requests waiting; None: queue_size")
    max_message_chars: int = Field(32_000, ge=1, description="longer user messages get 413")
    max_body_bytes: int = Field(2**20, ge=1024, description="request bodies over this get 413 before they are read")
    kv_budget: int | None = Field(None, ge=0, description="bytes of KV cache kept across turns; None: engine default")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="decode steps as one compiled graph per layer (artefacts in <data_dir>/compile); "
        "auto: on when the model runs on the CPU")
    request_timeout: float = Field(300.0, gt=0, description="seconds a request may wait for and use the model")
    reserve_for_reply: int = Field(512, ge=16, description="context tokens kept free for the reply")
    max_tokens: int = Field(512, ge=1, description="default reply length limit in tokens")
    summary_max_tokens: int = Field(256, ge=8, description="length limit of a running summary written by the model")
    keepalive_seconds: float = Field(10.0, gt=0, description="SSE keep-alive comment interval")
    engine_timeout: float = Field(30.0, gt=0, description="seconds without a byte from the remote engine before 503")
    engine_connect_timeout: float = Field(2.0, gt=0, description="seconds to connect to the remote engine")

    @field_validator("memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> Any:
        return parse_memory(value, source="MEMENTO_MEMORY")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        return [h.strip() for h in value.split(",") if h.strip()] if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _check_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            parse_api_keys(value)  # raises with a clear message
            return value or None
        return value

    @field_validator("engine_url", mode="before")
    @classmethod
    def _check_engine_url(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().rstrip("/") or None
            if value and not value.startswith(("http://", "https://")):
                raise ValueError(f"MEMENTO_ENGINE_URL must be http(s)://host:port/v1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _default_store_url(self) -> Settings:
        if not self.store_url:
            self.store_url = f"sqlite:///{self.data_dir / 'memento.db'}"
        return self

    @property
    def key_owners(self) -> dict[str, str]:
        """API key -> user name; empty when auth is off."""
        return parse_api_keys(self.api_keys.get_secret_value()) if self.api_keys else {}

    @property
    def admins(self) -> set[str]:
        """Users whose key entry ends in `:admin` (they manage shared personas)."""
        return parse_admins(self.api_keys.get_secret_value()) if self.api_keys else set()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.key_owners)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, ConfigFileSource(settings_cls, path))


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from env (+ `config_file`), with `overrides` (non-None values) on top."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    token = _CONFIG_FILE.set(Path(config_file) if config_file else None)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)


def parse_memory(value: Any, source: str = "memory") -> dict[str, Any]:
    """`summary_buffer`, `{"strategy": "window", "turns": 8}` (JSON text) or a dict -> the completed dict.

    The one definition is `memory.config`; this only turns its error into the ValueError settings expect.
    """
    from memory.config import MemoryConfigError, validate_memory_config

    try:
        return validate_memory_config(value, source=source)
    except MemoryConfigError as exc:
        raise ValueError(str(exc)) from exc


def parse_api_keys(text: str) -> dict[str, str]:
    """`key1:alice,key2:bob:admin` -> {"key1": "alice", "key2": "bob"}. Error messages never echo keys."""
    return {key: user for key, user, _ in _key_entries(text)}


def parse_admins(text: str) -> set[str]:
    return {user for _, user, admin in _key_entries(text) if admin}


def _key_entries(text: str) -> list[tuple[str, str, bool]]:
    """(key, user, admin) per `KEY:USER` or `KEY:USER:admin` entry."""
    entries = []
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        admin = item.endswith(":admin") and item.count(":") >= 2
        key, sep, user = item.removesuffix(":admin").rpartition(":") if admin else item.rpartition(":")
        if not sep or not key.strip() or not user.strip():
            raise ValueError(
                f"MEMENTO_API_KEYS entry #{i + 1} is not KEY:USER or KEY:USER:admin (format: key1:alice,key2:bob:admin)")
        entries.append((key.strip(), user.strip(), admin))
    return entries


class ConfigFileSource(PydanticBaseSettingsSource):
    """Reads a YAML / TOML / JSON file; keys may be `model` or `MEMENTO_MODEL`."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        super().__init__(settings_cls)
        self.path = path
        self.data = read_config_file(path, set(settings_cls.model_fields))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def read_config_file(path: Path, known: set[str]) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if tomllib is None:
                raise ValueError(f"--config {path}: TOML needs Python 3.11+; use YAML or JSON")
            raw = tomllib.loads(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:  # YAML is a superset of JSON, so anything else is read as YAML
            raw = yaml.safe_load(text) or {}
    except (ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"--config {path}: cannot parse: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings at the top level")
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lower().removeprefix("memento_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        data[name] = value
    return data
