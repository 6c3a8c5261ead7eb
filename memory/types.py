"""Plain records shared by stores, strategies and the service."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def now_iso() -> str:
    """UTC timestamp with microseconds, sortable as text."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Message:
    id: str
    session_id: str
    role: str  # "user" | "assistant" | "system"
    content: str
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_chat(self) -> dict[str, str]:
        """The {"role", "content"} form a chat template takes."""
        return {"role": self.role, "content": self.content}


@dataclass
class Session:
    id: str
    owner: str
    persona: str
    memory: dict[str, Any]  # e.g. {"strategy": "window", "turns": 8}
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_iso)
