"""The transcript store contract and the factory that picks an implementation from a URL.

Storage only: a store keeps sessions, their append-only transcripts and strategy state.
What enters the model's context is decided by memory strategies, never here.
"""

from __future__ import annotations

from typing import Any, Protocol

from memory.types import Message, Session


class StoreError(Exception):
    """Base class for store failures."""


class StoreUnavailable(StoreError):
    """The backing database cannot be reached (the service answers 503)."""


class SessionNotFound(StoreError):
    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class Store(Protocol):
    def create_session(
        self,
        owner: str,
        persona: str,
        memory: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session: ...

    def get_session(self, session_id: str, owner: str | None = None) -> Session | None: ...

    def list_sessions(self, owner: str) -> list[Session]: ...

    def update_session(
        self,
        session_id: str,
        *,
        persona: str | None = None,
        memory: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session: ...

    def delete_session(self, session_id: str) -> bool: ...

    def append_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Message: ...

    def list_messages(self, session_id: str) -> list[Message]: ...

    def get_state(self, session_id: str, key: str) -> dict[str, Any] | None: ...

    def put_state(self, session_id: str, key: str, value: dict[str, Any]) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def open_store(url: str, prefix: str = "memento") -> Store:
    """`sqlite:///path/to/file.db` or `redis://host:port/db`."""
    if url.startswith("sqlite:///"):
        from memory.sqlite_store import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :])
    if url.startswith(("redis://", "rediss://", "unix://")):
        from memory.redis_store import RedisStore

        return RedisStore(url, prefix=prefix)
    raise ValueError(
        f"MEMENTO_STORE_URL={url!r} is not supported: use sqlite:///path/to/file.db or redis://host:port/db"
    )
