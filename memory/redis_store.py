"""Transcript store on Redis (scale-out: several API processes share one server).

Plain Redis commands and Lua only (no RediSearch / RedisJSON): any stock `redis-server` >= 6 works.
Key layout: memory/redis_keys.py.

Durability guarantees
---------------------
* Each write is one atomic step on the server (a Lua script): `append_message` checks that the
  session exists, assigns the message's sequence number with INCR and RPUSHes the message, all
  or nothing. A client killed mid-call leaves either the whole message or none of it.
* The transcript is totally ordered by that sequence number (= list position), each message
  exactly once, across any number of threads, processes and hosts.
* Appends are idempotent by message id (`{prefix}:session:{id}:ids`), which is what makes the
  client's single automatic retry after a dropped connection safe: a retried append whose first
  attempt did land returns the stored message instead of writing it twice.
* What survives a *server* crash is Redis's persistence setting, not ours: run Redis with AOF
  (`appendonly yes`). With `appendfsync always` an acknowledged append survives power loss;
  with the default `appendfsync everysec` up to ~1 s of acknowledged writes can be lost on an
  OS crash or power loss (a killed redis-server process alone loses nothing that reached the
  kernel). Without AOF or RDB, nothing survives a restart. `docker-compose.yml` runs AOF on.
* Deleting a session removes every key of the session and its index entry in one atomic step,
  and leaves a vector tombstone in that step (its Chroma vectors are deleted later, whatever happens).
* Leases are `SET NX PX` with a fencing token from INCR (one script), so one holder across every
  process on the server; `cas_state` is WATCH/MULTI.
* Unreachable server: calls fail fast with `StoreUnavailable` (connect timeout 1 s, socket
  timeout 2 s; tune them with the constructor or in the URL:
  `redis://host:6379/0?socket_timeout=5&socket_connect_timeout=2`). Once Redis is back, the same
  store object works again: redis-py drops broken connections from its pool and opens fresh ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memory.redis_keys import RedisKeys
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
from memory.types import Message, Session

# Server replies that mean "Redis is there but cannot serve us right now" (-> HTTP 503).
_UNAVAILABLE_REPLIES = ("MISCONF", "READONLY", "OOM", "LOADING", "MASTERDOWN", "NOAUTH", "BUSY")

# KEYS: session, owner index. ARGV: session JSON, score, session id.
_CREATE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end  -- our own retried create
return 0
"""

# KEYS: session, seq, messages, ids. ARGV: message id, message JSON without its opening '{'.
# Returns {1, seq} when appended, {0, stored JSON} for a repeated id, {-1} for no session.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local seen = redis.call('HGET', KEYS[4], ARGV[1])
if seen then return {0, redis.call('LINDEX', KEYS[3], tonumber(seen) - 1)} end
local seq = redis.call('INCR', KEYS[2])
redis.call('RPUSH', KEYS[3], '{"seq":' .. seq .. ',' .. ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], seq)
return {1, seq}
"""

# Many messages in one atomic step (an import). KEYS as _APPEND. ARGV: id1, body1, id2, body2, ...
_APPEND_MANY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 1, #ARGV, 2 do
  local seq = redis.call('INCR', KEYS[2])
  redis.call('RPUSH', KEYS[3], '{"seq":' .. seq .. ',' .. ARGV[i + 1])
  redis.call('HSET', KEYS[4], ARGV[i], seq)
end
return 1
"""

# Compare-and-set of one stored message. KEYS: messages, ids. ARGV: id, expected element, new body
# without its opening '{'. Returns -1 for an unknown id, 0 when the element changed meanwhile.
_UPDATE_MESSAGE = """
local seq = redis.call('HGET', KEYS[2], ARGV[1])
if not seq then return -1 end
if redis.call('LINDEX', KEYS[1], tonumber(seq) - 1) ~= ARGV[2] then return 0 end
redis.call('LSET', KEYS[1], tonumber(seq) - 1, '{"seq":' .. seq .. ',' .. ARGV[3])
return 1
"""

# Remove messages and renumber the rest, so seq == list position + 1 keeps holding (LINDEX above).
# KEYS as _APPEND. ARGV: ids to remove. Returns how many were removed.
_DELETE_MESSAGES = """
local drop = {}
for i = 1, #ARGV do drop[ARGV[i]] = true end
local all = redis.call('LRANGE', KEYS[3], 0, -1)
local kept, removed = {}, 0
for _, el in ipairs(all) do
  if drop[cjson.decode(el)['id']] then removed = removed + 1 else table.insert(kept, el) end
end
if removed == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
for i, el in ipairs(kept) do
  local rest = string.sub(el, string.find(el, ',', 1, true) + 1)
  redis.call('RPUSH', KEYS[3], '{"seq":' .. i .. ',' .. rest)
  redis.call('HSET', KEYS[4], cjson.decode(el)['id'], i)
end
redis.call('SET', KEYS[2], #kept)
return removed
"""

# KEYS: session, state. ARGV: state key, JSON value.
_PUT_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# Compare-and-set of the session record. KEYS: session. ARGV: expected JSON, new JSON.
_UPDATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: session keys..., owner index, tombstones. ARGV: expected session JSON, session id, owner.
# The tombstone is written in the same step: the session's vectors are deleted later, whatever happens.
_DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 1, #KEYS - 2 do redis.call('DEL', KEYS[i]) end
redis.call('ZREM', KEYS[#KEYS - 1], ARGV[2])
redis.call('HSET', KEYS[#KEYS], ARGV[2], ARGV[3])
return 1
"""

# KEYS: lease, fence. ARGV: ttl ms. A fencing token, or 0 while someone holds the lease.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""

# KEYS: lease. ARGV: token, ttl ms (0: release). Only the token's holder renews or releases.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

_CAS_ATTEMPTS = 20  # concurrent updates of one session are rare; this only bounds a pathological loop


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _score(created_at: str) -> float:
    return datetime.fromisoformat(created_at).timestamp()


class RedisStore:
    """`Store` on a Redis server. Thread-safe (redis-py's connection pool)."""

    def __init__(
        self,
        url: str,
        prefix: str = "memento",
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
    ):
        self.url = url
        self.keys = RedisKeys(prefix)
        try:
            self._r = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_connect_timeout,
                # One immediate retry on a fresh connection: a pooled connection may be stale after a
                # Redis restart. Safe for writes because every script is idempotent (see module doc).
                retry=Retry(NoBackoff(), 1),
                health_check_interval=0,
            )
        except ValueError as e:
            raise ValueError(f"MEMENTO_STORE_URL={_redact(url)!r} is not a valid Redis URL: {e}") from e
        self._create = self._r.register_script(_CREATE)
        self._append = self._r.register_script(_APPEND)
        self._append_many = self._r.register_script(_APPEND_MANY)
        self._update_message = self._r.register_script(_UPDATE_MESSAGE)
        self._delete_messages = self._r.register_script(_DELETE_MESSAGES)
        self._put_state = self._r.register_script(_PUT_STATE)
        self._update = self._r.register_script(_UPDATE)
        self._delete = self._r.register_script(_DELETE)
        self._acquire = self._r.register_script(_ACQUIRE)
        self._renew = self._r.register_script(_RENEW)

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(
                f"Redis at {_redact(self.url)} is unreachable during {action} ({e}); "
                "check that redis-server runs and MEMENTO_STORE_URL points at it"
            ) from e
        except redis.ResponseError as e:
            if str(e).startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"Redis at {_redact(self.url)} refused {action}: {e}") from e
            raise StoreError(f"Redis at {_redact(self.url)}: {action} failed: {e}") from e
        except redis.RedisError as e:
            raise StoreError(f"Redis at {_redact(self.url)}: {action} failed: {e}") from e

    @staticmethod
    def _session(text: str) -> Session:
        return Session(**json.loads(text))

    @staticmethod
    def _message(text: str) -> Message:
        record = json.loads(text)
        record.pop("seq", None)
        return Message(**record)

    @staticmethod
    def _session_json(s: Session) -> str:
        record = {
            "id": s.id,
            "owner": s.owner,
            "persona": s.persona,
            "memory": json.loads(to_json("session memory", s.memory)),
            "metadata": json.loads(to_json("session metadata", s.metadata)),
            "created_at": s.created_at,
        }
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

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
        text = self._session_json(session)
        k = self.keys
        with self._errors("create_session"):
            created = self._create(
                keys=[k.session(session.id), k.owner_sessions(owner)],
                args=[text, repr(_score(session.created_at)), session.id],
            )
        if not created:
            raise SessionExists(session.id)
        return session

    def get_session(self, session_id: str, owner: str | None = None) -> Session | None:
        with self._errors("get_session"):
            text = self._r.get(self.keys.session(session_id))
        if text is None:
            return None
        session = self._session(text)
        return None if owner is not None and session.owner != owner else session

    def list_sessions(self, owner: str) -> list[Session]:
        """The owner's sessions, oldest first."""
        with self._errors("list_sessions"):
            ids = self._r.zrange(self.keys.owner_sessions(owner), 0, -1)
            texts = self._r.mget([self.keys.session(i) for i in ids]) if ids else []
        # A session deleted between the two reads is simply not listed.
        sessions = [self._session(t) for t in texts if t is not None]
        return [s for s in sessions if s.owner == owner]

    def update_session(
        self,
        session_id: str,
        *,
        persona: str | None = None,
        memory: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        key = self.keys.session(session_id)
        for _ in range(_CAS_ATTEMPTS):
            with self._errors("update_session"):
                old = self._r.get(key)
            if old is None:
                raise SessionNotFound(session_id)
            session = self._session(old)
            if persona is not None:
                session.persona = persona
            if memory is not None:
                session.memory = memory
            if metadata is not None:
                session.metadata = metadata
            with self._errors("update_session"):
                if self._update(keys=[key], args=[old, self._session_json(session)]):
                    return session
        raise StoreError(f"session {session_id!r} changed {_CAS_ATTEMPTS} times while updating it; retry")

    def delete_session(self, session_id: str) -> bool:
        k = self.keys
        for _ in range(_CAS_ATTEMPTS):
            with self._errors("delete_session"):
                old = self._r.get(k.session(session_id))
                if old is None:
                    return False
                owner = json.loads(old)["owner"]
                keys = [*k.session_keys(session_id), k.owner_sessions(owner), k.tombstones()]
                if self._delete(keys=keys, args=[old, session_id, owner]):
                    return True
        raise StoreError(f"session {session_id!r} changed {_CAS_ATTEMPTS} times while deleting it; retry")

    # -- transcript -----------------------------------------------------------------------

    def append_message(
        self,
        session_id: str,
        role: str,
        content: str,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Append atomically; acknowledged = on the server (see module doc for fsync). Raises SessionNotFound."""
        msg = new_message(session_id, role, content, metadata, message_id)
        body = self._message_body(msg)
        k = self.keys
        keys = [k.session(session_id), k.seq(session_id), k.messages(session_id), k.message_ids(session_id)]
        with self._errors("append_message"):
            reply = self._append(keys=keys, args=[msg.id, body[1:]])  # body[1:]: the script prepends seq
        if reply[0] == -1:
            raise SessionNotFound(session_id)
        if reply[0] == 0:
            return self._message(reply[1])  # this id was appended before (a retry)
        return msg

    @staticmethod
    def _message_body(msg: Message) -> str:
        """The stored JSON of a message, without the `seq` the scripts put first."""
        record = {
            "id": msg.id,
            "session_id": msg.session_id,
            "role": msg.role,
            "content": msg.content,
            "created_at": msg.created_at,
            "metadata": json.loads(to_json("message metadata", msg.metadata)),
        }
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    def _message_keys(self, session_id: str) -> list[str]:
        k = self.keys
        return [k.session(session_id), k.seq(session_id), k.messages(session_id), k.message_ids(session_id)]

    def append_messages(self, session_id: str, items: list[dict[str, Any]]) -> list[Message]:
        """Append all of `items` in one atomic script (an import: all or nothing)."""
        msgs = new_messages(session_id, items)
        args: list[str] = []
        for m in msgs:
            args += [m.id, self._message_body(m)[1:]]
        with self._errors("append_messages"):
            reply = self._append_many(keys=self._message_keys(session_id), args=args)
        if reply == -1:
            raise SessionNotFound(session_id)
        return msgs

    def update_message(
        self, session_id: str, message_id: str, *, content: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Message:
        """Change a message in place (position and created_at stay), compare-and-set. MessageNotFound."""
        k = self.keys
        for _ in range(_CAS_ATTEMPTS):
            with self._errors("update_message"):
                seq = self._r.hget(k.message_ids(session_id), message_id)
                old_text = self._r.lindex(k.messages(session_id), int(seq) - 1) if seq else None
            if old_text is None:
                raise MessageNotFound(session_id, message_id)
            old = self._message(old_text)
            new = new_message(
                session_id, old.role, old.content if content is None else content,
                old.metadata if metadata is None else metadata, old.id, old.created_at,
            )
            with self._errors("update_message"):
                done = self._update_message(
                    keys=[k.messages(session_id), k.message_ids(session_id)],
                    args=[message_id, old_text, self._message_body(new)[1:]],
                )
            if done == -1:
                raise MessageNotFound(session_id, message_id)
            if done == 1:
                return new
        raise StoreError(f"message {message_id!r} changed {_CAS_ATTEMPTS} times while updating it; retry")

    def delete_messages(self, session_id: str, message_ids: list[str]) -> int:
        """Remove those messages of the session atomically (the rest renumbered); unknown ids ignored."""
        if not message_ids:
            return 0
        with self._errors("delete_messages"):
            return int(self._delete_messages(keys=self._message_keys(session_id), args=list(message_ids)))

    def list_messages(self, session_id: str) -> list[Message]:
        """The whole transcript, oldest first. Raises SessionNotFound."""
        k = self.keys
        with self._errors("list_messages"):
            pipe = self._r.pipeline(transaction=True)  # MULTI/EXEC: existence and list agree
            pipe.exists(k.session(session_id))
            pipe.lrange(k.messages(session_id), 0, -1)
            exists, texts = pipe.execute()
        if not exists:
            raise SessionNotFound(session_id)
        return [self._message(t) for t in texts]

    # -- strategy state -------------------------------------------------------------------

    def get_state(self, session_id: str, key: str) -> dict[str, Any] | None:
        with self._errors("get_state"):
            text = self._r.hget(self.keys.state(session_id), key)
        return None if text is None else json.loads(text)

    def put_state(self, session_id: str, key: str, value: dict[str, Any]) -> None:
        """Replace the state under `key`. Raises SessionNotFound."""
        text = to_json(f"state {key!r}", value)
        k = self.keys
        with self._errors("put_state"):
            stored = self._put_state(keys=[k.session(session_id), k.state(session_id)], args=[key, text])
        if not stored:
            raise SessionNotFound(session_id)

    def cas_state(
        self, session_id: str, key: str, expected: dict[str, Any] | None, value: dict[str, Any]
    ) -> bool:
        """put_state only if the stored state still equals `expected` (WATCH/MULTI: compared as
        JSON values, not text, so key order does not matter)."""
        text = to_json(f"state {key!r}", value)
        k = self.keys
        with self._errors("cas_state"), self._r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(k.session(session_id), k.state(session_id))
                if not pipe.exists(k.session(session_id)):
                    raise SessionNotFound(session_id)
                stored = pipe.hget(k.state(session_id), key)
                if (None if stored is None else json.loads(stored)) != expected:
                    return False
                pipe.multi()
                pipe.hset(k.state(session_id), key, text)
                pipe.execute()
            except redis.WatchError:
                return False  # changed between our read and the write
        return True

    # -- personas -------------------------------------------------------------------------

    def put_persona(self, owner: str, name: str, text: str) -> None:
        with self._errors("put_persona"):
            self._r.hset(self.keys.personas(owner), name, text)

    def get_persona(self, owner: str, name: str) -> str | None:
        with self._errors("get_persona"):
            text = self._r.hget(self.keys.personas(owner), name)
        return None if text is None else str(text)  # decode_responses=True: already str

    def list_personas(self, owner: str) -> dict[str, str]:
        with self._errors("list_personas"):
            stored = self._r.hgetall(self.keys.personas(owner))
        return {str(k): str(v) for k, v in sorted(stored.items())}

    def delete_persona(self, owner: str, name: str) -> bool:
        with self._errors("delete_persona"):
            return bool(self._r.hdel(self.keys.personas(owner), name))

    # -- vector tombstones ----------------------------------------------------------------

    def list_tombstones(self) -> list[tuple[str, str]]:
        with self._errors("list_tombstones"):
            stored = self._r.hgetall(self.keys.tombstones())
        return [(str(sid), str(owner)) for sid, owner in stored.items()]

    def drop_tombstone(self, session_id: str) -> None:
        with self._errors("drop_tombstone"):
            self._r.hdel(self.keys.tombstones(), session_id)

    # -- leases (SET NX PX, in a script that also issues the fencing token) -----------------

    def acquire_lease(self, name: str, ttl_ms: int) -> int | None:
        with self._errors("acquire_lease"):
            token = int(self._acquire(keys=[self.keys.lease(name), self.keys.lease_fence(name)], args=[ttl_ms]))
        return token or None

    def renew_lease(self, name: str, token: int, ttl_ms: int) -> bool:
        with self._errors("renew_lease"):
            return bool(self._renew(keys=[self.keys.lease(name)], args=[str(token), str(ttl_ms)]))

    def release_lease(self, name: str, token: int) -> None:
        with self._errors("release_lease"):
            self._renew(keys=[self.keys.lease(name)], args=[str(token), "0"])

    # -- lifecycle ------------------------------------------------------------------------

    def ping(self) -> None:
        with self._errors("ping"):
            self._r.ping()

    def close(self) -> None:
        self._r.close()

    def __repr__(self) -> str:
        return f"RedisStore({_redact(self.url)!r}, prefix={self.keys.prefix!r})"
