"""Embedded transcript store on SQLite (the default: no server needed).

Durability guarantees
---------------------
* Every write is one SQLite transaction that is committed before the method returns:
  when `append_message` returns, the message is in the database file.
* The database runs in WAL mode with `synchronous=FULL`: each commit fsyncs the write-ahead
  log, so an acknowledged append survives a process crash (SIGKILL) *and* an OS crash or power
  loss. (`synchronous=NORMAL` would be faster but may lose the last commits on power loss;
  a chat transcript is the source of truth, so we pay one fsync per message.)
* Messages are totally ordered by an AUTOINCREMENT `seq` assigned inside the committing
  transaction, so concurrent writers (threads or processes) never interleave half-written
  messages and `list_messages` returns them in commit order, each exactly once.
* Deleting a session removes its messages and strategy state in the same transaction, and
  leaves a vector tombstone (session id, owner) there, so its Chroma vectors are deleted later
  even if Chroma is down or the process dies right after.
* Leases (`acquire_lease`) and `cas_state` are transactions on the file, so they hold across
  every process sharing it.
* Several processes may share one file (WAL lets readers run beside the single writer);
  a writer waits up to `busy_timeout_s` for the write lock, then `StoreUnavailable` is raised.
* The schema version lives in `PRAGMA user_version`; opening a file written by a newer
  Memento fails with a clear `StoreError` instead of guessing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memory.store import (
    MessageNotFound,
    SessionExists,
    SessionNotFound,
    StoreError,
    StoreUnavailable,
    new_message,
    new_messages,
    new_session,
    to_json,
)
from memory.types import Message, Session, now_iso

SCHEMA_VERSION = 2

# One entry per version: the statements that bring a database from version i to i + 1.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            persona TEXT NOT NULL,
            memory TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX sessions_by_owner ON sessions (owner, created_at)",
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX messages_by_session ON messages (session_id, seq)",
        """CREATE TABLE state (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (session_id, key)
        )""",
    ],
    [  # 2: personas in the store (owner "" = shared), vector tombstones, leases
        """CREATE TABLE personas (
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            text TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (owner, name)
        )""",
        """CREATE TABLE tombstones (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL
        )""",
        # rows stay after release (expires_at 0) so the fencing token keeps increasing per name
        "CREATE TABLE leases (name TEXT PRIMARY KEY, token INTEGER NOT NULL, expires_at REAL NOT NULL)",
    ],
]


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one worth reporting


class SQLiteStore:
    """`Store` on one SQLite file. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"cannot create the directory for SQLite store {self.path}: {e}") from e
        with self._errors("open"):
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the write
            # lock up front instead of failing on a read->write upgrade under contention.
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                self._enable_wal(conn)
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switching a file to WAL needs an exclusive lock, and SQLite answers "database is locked"
        at once, without waiting through the busy timeout, while another process opens the same
        new file (replicas starting together: 5 of 60 opens failed in a 6-process race). So retry
        within the busy timeout; once one opener has switched the file, the others find WAL set."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate sqlite3 errors into store errors that say what happened and what to do."""
        try:
            yield
        except sqlite3.OperationalError as e:
            text = str(e)
            if "locked" in text or "busy" in text:
                raise StoreUnavailable(
                    f"SQLite store {self.path} stayed locked by another writer for more than "
                    f"{self.busy_timeout_s:g} s during {action}; retry, or use Redis for many writers"
                ) from e
            if "unable to open" in text or "readonly" in text:
                raise StoreUnavailable(
                    f"SQLite store {self.path} cannot be opened for writing during {action} ({text}); "
                    "check the path and its permissions (MEMENTO_DATA_DIR / MEMENTO_STORE_URL)"
                ) from e
            if "full" in text:
                raise StoreError(
                    f"SQLite store {self.path}: disk full during {action}; free space and retry"
                ) from e
            raise StoreError(f"SQLite store {self.path}: {action} failed: {text}") from e
        except sqlite3.DatabaseError as e:
            raise StoreError(
                f"SQLite store {self.path}: {action} failed: {e} (is it a Memento database? "
                "`sqlite3 FILE 'PRAGMA integrity_check'` tells whether it is damaged)"
            ) from e

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"SQLite store {self.path} is closed")
        return self._conn

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(action):
            yield self._db()

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One committed transaction; rolled back if the body raises."""
        with self._lock, self._errors(action):
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)  # also after a failed COMMIT (disk full), so the next call starts clean
                raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite store {self.path} has schema version {version}, newer than this Memento "
                f"({SCHEMA_VERSION}); upgrade Memento or point MEMENTO_STORE_URL at another file"
            )
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in MIGRATIONS[version:]:
                for sql in step:
                    conn.execute(sql)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    @staticmethod
    def _session(row: tuple) -> Session:
        id_, owner, persona, memory, metadata, created_at = row
        return Session(
            id=id_,
            owner=owner,
            persona=persona,
            memory=json.loads(memory),
            metadata=json.loads(metadata),
            created_at=created_at,
        )

    @staticmethod
    def _message(row: tuple) -> Message:
        id_, session_id, role, content, metadata, created_at = row
        return Message(
            id=id_,
            session_id=session_id,
            role=role,
            content=content,
            created_at=created_at,
            metadata=json.loads(metadata),
        )

    _SESSION_COLS = "id, owner, persona, memory, metadata, created_at"
    _MESSAGE_COLS = "id, session_id, role, content, metadata, created_at"

    # -- sessions -------------------------------------------------------------------------

    def create_session(
        self,
        owner: str,
        persona: str,
        memory: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        session = new_session(owner, persona, memory, metadata, session_id)
        row = (
            session.id,
            owner,
            persona,
            to_json("session memory", memory),
            to_json("session metadata", session.metadata),
            session.created_at,
        )
        with self._write("create_session") as db:
            if db.execute("SELECT 1 FROM sessions WHERE id = ?", (session.id,)).fetchone():
                raise SessionExists(session.id)
            db.execute(f"INSERT INTO sessions ({self._SESSION_COLS}) VALUES (?, ?, ?, ?, ?, ?)", row)
        return session

    def get_session(self, session_id: str, owner: str | None = None) -> Session | None:
        with self._read("get_session") as db:
            row = db.execute(
                f"SELECT {self._SESSION_COLS} FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        if row is None or (owner is not None and row[1] != owner):
            return None
        return self._session(row)

    def list_sessions(self, owner: str) -> list[Session]:
        """The owner's sessions, oldest first."""
        with self._read("list_sessions") as db:
            rows = db.execute(
                f"SELECT {self._SESSION_COLS} FROM sessions WHERE owner = ? ORDER BY created_at, rowid",
                (owner,),
            ).fetchall()
        return [self._session(r) for r in rows]

    def update_session(
        self,
        session_id: str,
        *,
        persona: str | None = None,
        memory: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        changes: dict[str, str] = {}
        if persona is not None:
            changes["persona"] = persona
        if memory is not None:
            changes["memory"] = to_json("session memory", memory)
        if metadata is not None:
            changes["metadata"] = to_json("session metadata", metadata)
        with self._write("update_session") as db:
            if changes:
                sets = ", ".join(f"{col} = ?" for col in changes)  # column names are ours, not input
                db.execute(f"UPDATE sessions SET {sets} WHERE id = ?", (*changes.values(), session_id))
            row = db.execute(
                f"SELECT {self._SESSION_COLS} FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None:
                raise SessionNotFound(session_id)
        return self._session(row)

    def delete_session(self, session_id: str) -> bool:
        with self._write("delete_session") as db:
            # Explicit deletes rather than relying on ON DELETE CASCADE alone: a file opened by a
            # tool without `PRAGMA foreign_keys=ON` must not leave orphans behind either.
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM state WHERE session_id = ?", (session_id,))
            # the tombstone commits with the delete: vectors in Chroma go later, even after a crash
            db.execute(
                "INSERT OR IGNORE INTO tombstones (session_id, owner) SELECT id, owner FROM sessions WHERE id = ?",
                (session_id,),
            )
            return db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

    # -- transcript -----------------------------------------------------------------------

    def append_message(
        self,
        session_id: str,
        role: str,
        content: str,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Append and commit (fsync'd) before returning. Raises SessionNotFound."""
        msg = new_message(session_id, role, content, metadata, message_id)
        meta = to_json("message metadata", msg.metadata)
        with self._write("append_message") as db:
            if not db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionNotFound(session_id)
            if message_id is not None:
                row = db.execute(
                    f"SELECT {self._MESSAGE_COLS} FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                if row is not None:
                    if row[1] != session_id:
                        raise StoreError(f"message id {message_id!r} is already used by another session")
                    return self._message(row)  # a retried append: already stored once
            db.execute(
                f"INSERT INTO messages ({self._MESSAGE_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                (msg.id, session_id, role, content, meta, msg.created_at),
            )
        return msg

    def append_messages(self, session_id: str, items: list[dict[str, Any]]) -> list[Message]:
        """Append all of `items` in one committed transaction (an import: all or nothing)."""
        msgs = new_messages(session_id, items)
        rows = [
            (m.id, session_id, m.role, m.content, to_json("message metadata", m.metadata), m.created_at)
            for m in msgs
        ]
        with self._write("append_messages") as db:
            if not db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionNotFound(session_id)
            db.executemany(f"INSERT INTO messages ({self._MESSAGE_COLS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
        return msgs

    def update_message(
        self, session_id: str, message_id: str, *, content: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Message:
        """Change a message in place (its position and created_at stay). Raises MessageNotFound."""
        with self._write("update_message") as db:
            row = db.execute(
                f"SELECT {self._MESSAGE_COLS} FROM messages WHERE id = ? AND session_id = ?",
                (message_id, session_id),
            ).fetchone()
            if row is None:
                raise MessageNotFound(session_id, message_id)
            old = self._message(row)
            new = new_message(
                session_id, old.role, old.content if content is None else content,
                old.metadata if metadata is None else metadata, old.id, old.created_at,
            )
            db.execute(
                "UPDATE messages SET content = ?, metadata = ? WHERE id = ?",
                (new.content, to_json("message metadata", new.metadata), message_id),
            )
        return new

    def delete_messages(self, session_id: str, message_ids: list[str]) -> int:
        """Remove those messages of the session in one transaction; unknown ids are ignored."""
        with self._write("delete_messages") as db:
            return sum(
                db.execute("DELETE FROM messages WHERE id = ? AND session_id = ?", (mid, session_id)).rowcount
                for mid in message_ids
            )

    def list_messages(self, session_id: str) -> list[Message]:
        """The whole transcript in commit order. Raises SessionNotFound."""
        with self._read("list_messages") as db:
            # One read transaction so the existence check and the rows agree.
            db.execute("BEGIN")
            try:
                exists = db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
                rows = db.execute(
                    f"SELECT {self._MESSAGE_COLS} FROM messages WHERE session_id = ? ORDER BY seq",
                    (session_id,),
                ).fetchall()
            finally:
                _rollback(db)  # read-only: nothing to commit
        if not exists:
            raise SessionNotFound(session_id)
        return [self._message(r) for r in rows]

    # -- strategy state -------------------------------------------------------------------

    def get_state(self, session_id: str, key: str) -> dict[str, Any] | None:
        with self._read("get_state") as db:
            row = db.execute(
                "SELECT value FROM state WHERE session_id = ? AND key = ?", (session_id, key)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def put_state(self, session_id: str, key: str, value: dict[str, Any]) -> None:
        """Replace the state under `key`. Raises SessionNotFound."""
        text = to_json(f"state {key!r}", value)
        with self._write("put_state") as db:
            if not db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionNotFound(session_id)
            db.execute(
                "INSERT INTO state (session_id, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (session_id, key, text, now_iso()),
            )

    def cas_state(
        self, session_id: str, key: str, expected: dict[str, Any] | None, value: dict[str, Any]
    ) -> bool:
        """put_state only if the stored state still equals `expected` (one transaction)."""
        text = to_json(f"state {key!r}", value)
        with self._write("cas_state") as db:
            if not db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionNotFound(session_id)
            row = db.execute("SELECT value FROM state WHERE session_id = ? AND key = ?", (session_id, key)).fetchone()
            if (None if row is None else json.loads(row[0])) != expected:
                return False
            db.execute(
                "INSERT INTO state (session_id, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (session_id, key, text, now_iso()),
            )
        return True

    # -- personas -------------------------------------------------------------------------

    def put_persona(self, owner: str, name: str, text: str) -> None:
        with self._write("put_persona") as db:
            db.execute(
                "INSERT INTO personas (owner, name, text, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (owner, name) DO UPDATE SET text = excluded.text, updated_at = excluded.updated_at",
                (owner, name, text, now_iso()),
            )

    def get_persona(self, owner: str, name: str) -> str | None:
        with self._read("get_persona") as db:
            row = db.execute("SELECT text FROM personas WHERE owner = ? AND name = ?", (owner, name)).fetchone()
        return None if row is None else row[0]

    def list_personas(self, owner: str) -> dict[str, str]:
        with self._read("list_personas") as db:
            rows = db.execute("SELECT name, text FROM personas WHERE owner = ? ORDER BY name", (owner,)).fetchall()
        return dict(rows)

    def delete_persona(self, owner: str, name: str) -> bool:
        with self._write("delete_persona") as db:
            return db.execute("DELETE FROM personas WHERE owner = ? AND name = ?", (owner, name)).rowcount > 0

    # -- vector tombstones ----------------------------------------------------------------

    def list_tombstones(self) -> list[tuple[str, str]]:
        with self._read("list_tombstones") as db:
            return [(r[0], r[1]) for r in db.execute("SELECT session_id, owner FROM tombstones ORDER BY seq")]

    def drop_tombstone(self, session_id: str) -> None:
        with self._write("drop_tombstone") as db:
            db.execute("DELETE FROM tombstones WHERE session_id = ?", (session_id,))

    # -- leases ---------------------------------------------------------------------------
    # Wall-clock expiry: every process sharing a SQLite file runs on the same host.

    def acquire_lease(self, name: str, ttl_ms: int) -> int | None:
        now = time.time()
        with self._write("acquire_lease") as db:
            row = db.execute("SELECT token, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[1] > now:
                return None
            token = (row[0] if row else 0) + 1
            db.execute(
                "INSERT INTO leases (name, token, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at",
                (name, token, now + ttl_ms / 1000),
            )
        return token

    def renew_lease(self, name: str, token: int, ttl_ms: int) -> bool:
        with self._write("renew_lease") as db:
            # the token alone decides: an expired lease nobody took since is still ours to keep
            return db.execute(
                "UPDATE leases SET expires_at = ? WHERE name = ? AND token = ?", (time.time() + ttl_ms / 1000, name, token)
            ).rowcount > 0

    def release_lease(self, name: str, token: int) -> None:
        with self._write("release_lease") as db:
            db.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND token = ?", (name, token))

    # -- lifecycle ------------------------------------------------------------------------

    def ping(self) -> None:
        with self._read("ping") as db:
            db.execute("SELECT 1").fetchone()

    def integrity_check(self) -> str:
        """`PRAGMA integrity_check`: "ok" for a sound file."""
        with self._read("integrity_check") as db:
            return "\n".join(r[0] for r in db.execute("PRAGMA integrity_check").fetchall())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
