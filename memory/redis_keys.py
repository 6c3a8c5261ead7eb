"""Every Redis key Memento uses, built in one place under a configurable prefix.

    {prefix}:session:{id}            string  session record (JSON)
    {prefix}:session:{id}:messages   list    transcript, one JSON message per element, oldest first
    {prefix}:session:{id}:seq        string  INCR counter giving each message its sequence number
    {prefix}:session:{id}:ids        hash    message id -> seq (makes a retried append a no-op)
    {prefix}:session:{id}:state      hash    strategy state key -> JSON
    {prefix}:owner:{owner}:sessions  zset    session ids scored by creation time (epoch seconds)

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

    def pattern(self) -> str:
        """SCAN pattern matching every key under this prefix (tests clean up with it)."""
        return f"{self.prefix}:*"
