"""The transcript store contract and the factory that picks an implementation from a URL.

Storage only: a store keeps sessions, their append-only transcripts and strategy state.
What enters the model's context is decided by memory strategies, never here.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from memory.types import Message, Session, new_id, now_iso


class StoreError(Exception):
    """Base class for store failures."""


class StoreUnavailable(StoreError):
    """The backing database cannot be reached (the service answers 503)."""


class SessionNotFound(StoreError):
    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class MessageNotFound(StoreError):
    def __init__(self, session_id: str, message_id: str):
        super().__init__(f"message {message_id!r} not found in session {session_id!r}")
        self.session_id = session_id
        self.message_id = message_id


class SessionExists(StoreError):
    """create_session was given an id that is already taken."""

    def __init__(self, session_id: str):
        super().__init__(f"session {session_id!r} already exists; pick another id or omit it")
        self.session_id = session_id


ROLES = ("user", "assistant", "system")


def check_message(role: str, content: str) -> None:
    """Reject what no store should keep, naming the field and the fix."""
    if role not in ROLES:
        raise ValueError(f"message role {role!r} is not supported: use one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string, got {type(content).__name__}")


def new_session(
    owner: str, persona: str, memory: dict[str, Any], metadata: dict[str, Any] | None = None, session_id: str | None = None
) -> Session:
    """A Session ready to create: id (unless the caller names one) and timestamp set here."""
    return Session(id=session_id or new_id("sess"), owner=owner, persona=persona, memory=memory, metadata=metadata or {})


def new_message(
    session_id: str,
    role: str,
    content: str,
    metadata: dict[str, Any] | None = None,
    message_id: str | None = None,
    created_at: str | None = None,
) -> Message:
    """A checked Message ready to append: id (unless the caller retries with its own) and timestamp
    set here (an import keeps the original `created_at`)."""
    check_message(role, content)
    return Message(
        id=message_id or new_id("msg"),
        session_id=session_id,
        role=role,
        content=content,
        created_at=created_at or now_iso(),
        metadata=metadata or {},
    )


def new_messages(session_id: str, items: list[dict[str, Any]]) -> list[Message]:
    """Checked Messages for `append_messages`: each item {role, content, metadata?, created_at?, id?}."""
    return [
        new_message(
            session_id, it["role"], it["content"], it.get("metadata"), it.get("id"), it.get("created_at")
        )
        for it in items
    ]


def to_json(field: str, value: Any) -> str:
    """JSON text for a stored dict; the error names the field that is not serialisable."""
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object (dict), got {type(value).__name__}")
    try:
        # ensure_ascii=False keeps Korean and emoji readable in the database.
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field} is not JSON-serialisable ({e}); store plain str/int/float/bool/list/dict") from e


class Store(Protocol):
    def create_session(
        self,
        owner: str,
        persona: str,
        memory: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session: ...  # SessionExists when session_id is taken

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
        self,
        session_id: str,
        role: str,
        content: str,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Message: ...
    # message_id given and already in this session: the stored message is returned, nothing is
    # appended (so a client may retry an append whose answer it never saw).

    def append_messages(self, session_id: str, items: list[dict[str, Any]]) -> list[Message]: ...
    # all or nothing, in order (an import); items {role, content, metadata?, created_at?}

    def update_message(
        self, session_id: str, message_id: str, *, content: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Message: ...  # in place (position and created_at kept); MessageNotFound

    def delete_messages(self, session_id: str, message_ids: list[str]) -> int: ...
    # removes those of the session (unknown ids are ignored); returns how many were removed

    def list_messages(self, session_id: str) -> list[Message]: ...  # oldest first; SessionNotFound

    def get_state(self, session_id: str, key: str) -> dict[str, Any] | None: ...

    def put_state(self, session_id: str, key: str, value: dict[str, Any]) -> None: ...  # SessionNotFound

    def cas_state(
        self, session_id: str, key: str, expected: dict[str, Any] | None, value: dict[str, Any]
    ) -> bool: ...
    # put_state only if the stored state still equals `expected` (None: absent); False when it
    # changed meanwhile (another process folded first). SessionNotFound.

    # -- personas written through the API; persona/registry.py decides who may write which.
    # Owner "" holds the shared ones an admin wrote; every replica sees the same set.

    def put_persona(self, owner: str, name: str, text: str) -> None: ...

    def get_persona(self, owner: str, name: str) -> str | None: ...

    def list_personas(self, owner: str) -> dict[str, str]: ...  # name -> persona file text

    def delete_persona(self, owner: str, name: str) -> bool: ...

    # -- vector tombstones: delete_session leaves (session_id, owner) in the same transaction;
    # whoever deletes the session's vectors from Chroma drops it (memory/vector_store.py).

    def list_tombstones(self) -> list[tuple[str, str]]: ...  # (session_id, owner)

    def drop_tombstone(self, session_id: str) -> None: ...

    # -- leases: one holder across every process on this store (memory/leases.py)

    def acquire_lease(self, name: str, ttl_ms: int) -> int | None: ...
    # a fencing token (increasing per name) or None while another holder's lease is unexpired

    def renew_lease(self, name: str, token: int, ttl_ms: int) -> bool: ...  # False: lost it

    def release_lease(self, name: str, token: int) -> None: ...  # only if `token` still holds it

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
