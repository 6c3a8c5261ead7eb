"""Every Redis key Memento uses, built in one place under a configurable prefix.

    {prefix}:session:{id}            string  session record (JSON)
    {prefix}:session:{id}:messages   list    transcript, one JSON message per element, oldest first
    {prefix}:session:{id}:seq        string  INCR counter giving each message its sequence number
    {prefix}:session:{id}:ids        hash    message id -> seq (makes a retried append a no-op)
    {prefix}:session:{id}:state      hash    strategy state key -> JSON
    {prefix}:owner:{owner}:sessions  zset    session ids scored by creation time (epoch seconds)
    {prefix}:personas:{owner}        hash    persona name -> persona file text (owner "" = shared)
    {prefix}:tombstones              hash    deleted session id -> owner (its vectors still to delete)
    {prefix}:lease:{name}            string  the holder's fencing token, with a PX expiry
    {prefix}:lease:{name}:fence      string  INCR counter issuing the fencing tokens

Ids and owners come from clients (X-Session-ID, API key owners), so they are percent-encoded:
a ':' or '*' in them can neither reach another key nor widen a SCAN pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


def _part(value: str) -> str:
    return quote(value, safe="-_.~@+=")


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "memento"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in " *?[]"):
            raise ValueError(
                f"Redis key prefix {self.prefix!r} is not usable: give a non-empty name without "
                "spaces or glob characters (*?[]), e.g. 'memento'"
            )

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{_part(session_id)}"

    def messages(self, session_id: str) -> str:
        return f"{self.session(session_id)}:messages"

    def seq(self, session_id: str) -> str:
        return f"{self.session(session_id)}:seq"

    def message_ids(self, session_id: str) -> str:
        return f"{self.session(session_id)}:ids"

    def state(self, session_id: str) -> str:
        return f"{self.session(session_id)}:state"

    def session_keys(self, session_id: str) -> list[str]:
        """All keys that belong to one session (deleted together)."""
        return [
            self.session(session_id),
            self.messages(session_id),
            self.seq(session_id),
            self.message_ids(session_id),
            self.state(session_id),
        ]

    def owner_sessions(self, owner: str) -> str:
        return f"{self.prefix}:owner:{_part(owner)}:sessions"

    def personas(self, owner: str) -> str:
        return f"{self.prefix}:personas:{_part(owner)}"

    def tombstones(self) -> str:
        return f"{self.prefix}:tombstones"

    def lease(self, name: str) -> str:
        return f"{self.prefix}:lease:{_part(name)}"

    def lease_fence(self, name: str) -> str:
        return f"{self.lease(name)}:fence"

    def pattern(self) -> str:
        """SCAN pattern matching every key under this prefix (tests clean up with it)."""
        return f"{self.prefix}:*"
