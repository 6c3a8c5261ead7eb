"""Chat transcripts in and out: Memento's `{"messages": [...]}` and SillyTavern's chat file (JSONL).

A SillyTavern chat file is one JSON object per line: a header
`{"user_name", "character_name", "create_date", "chat_metadata"}`, then one line per message
`{"name", "is_user", "is_system", "send_date", "mes", "extra", "swipes"?, "swipe_id"?}`.
Roles: `is_user` -> user; `extra.type == "narrator"` -> system; otherwise assistant. A message
SillyTavern hid from the model (`is_system` on a non-narrator line) is imported with metadata
`{"hidden": true}`. Swipes (alternative replies) travel as metadata `swipes` / `swipe_id`, the
same shape the chat operations use, so a chat keeps its alternatives both ways. SillyTavern's
author's note (`chat_metadata.note_prompt`, `note_depth`, `note_interval`, `note_role`) becomes
the session's `authors_note` and is written back on export.

`parse_chat(body)` -> `ParsedChat`; `export_sillytavern(...)` -> JSONL text. Errors are
`ChatFileError` naming the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

MAX_IMPORT_MESSAGES = 20_000
ROLES = ("user", "assistant", "system")
# SillyTavern writes send_date as "June 19, 2023 4:13pm" and create_date as "2023-06-19@16h13m45s"
ST_SEND_DATE = "%B %d, %Y %I:%M%p"
ST_CREATE_DATE = "%Y-%m-%d@%Hh%Mm%Ss"


class ChatFileError(ValueError):
    def __init__(self, message: str, *, line: int | None = None, field: str | None = None):
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{message}")
        self.line = line
        self.field = field


@dataclass
class ParsedChat:
    messages: list[dict[str, Any]]  # {role, content, created_at?, metadata}
    format: str  # "messages" | "sillytavern"
    user_name: str | None = None
    character_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_chat(body: bytes | str) -> ParsedChat:
    """A `{"messages": [...]}` object or a SillyTavern JSONL chat (told apart by their shape)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise ChatFileError("the body is empty: send {\"messages\": [...]} or a SillyTavern .jsonl chat")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # several lines: JSONL
    if isinstance(whole, dict) and "messages" in whole:
        return _parse_messages(whole)
    return _parse_sillytavern(text)


def _parse_messages(obj: dict[str, Any]) -> ParsedChat:
    items = obj["messages"]
    if not isinstance(items, list):
        raise ChatFileError("must be a list of {role, content, created_at?}", field="messages")
    _check_count(len(items))
    out = []
    for i, item in enumerate(items):
        where = f"messages.{i}"
        if not isinstance(item, dict):
            raise ChatFileError(f"{where}: must be an object {{role, content, created_at?}}", field=where)
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ChatFileError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", field=f"{where}.role")
        if not isinstance(content, str):
            raise ChatFileError(f"{where}.content: must be text", field=f"{where}.content")
        created = _parse_time(item.get("created_at"), f"{where}.created_at") if item.get("created_at") else None
        meta = _dict(item.get("metadata"))
        out.append({"role": role, "content": content, "created_at": created, "metadata": {**meta, "imported": True}})
    return ParsedChat(out, "messages")


def _parse_sillytavern(text: str) -> ParsedChat:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatFileError(
                f"not JSON ({e.msg}); a SillyTavern chat has one JSON object per line, "
                "or send {\"messages\": [...]}",
                line=n,
            ) from None
        if not isinstance(rec, dict):
            raise ChatFileError("each line must be a JSON object", line=n)
        records.append((n, rec))
    header: dict[str, Any] = {}
    if records and "mes" not in records[0][1]:
        header = records.pop(0)[1]
    _check_count(len(records))
    messages = [_st_message(n, rec) for n, rec in records]
    chat_meta = _dict(header.get("chat_metadata"))
    return ParsedChat(
        messages, "sillytavern", _str(header.get("user_name")), _str(header.get("character_name")), chat_meta
    )


def _st_message(n: int, rec: dict[str, Any]) -> dict[str, Any]:
    mes = rec.get("mes")
    if not isinstance(mes, str):
        raise ChatFileError("'mes' (the message text) is missing or not text", line=n, field="mes")
    extra = _dict(rec.get("extra"))
    ours = _dict(extra.get("memento"))
    if rec.get("is_user"):
        role = "user"
    elif extra.get("type") == "narrator":
        role = "system"
    else:
        role = "assistant"
    meta: dict[str, Any] = dict(ours.get("metadata") or {}) if isinstance(ours.get("metadata"), dict) else {}
    meta["imported"] = True
    if rec.get("name"):
        meta["name"] = str(rec["name"])
    if rec.get("is_system") and role != "system":
        meta["hidden"] = True
    swipes = rec.get("swipes")
    if role == "assistant" and isinstance(swipes, list) and len(swipes) > 1 and all(isinstance(s, str) for s in swipes):
        sid = rec["swipe_id"] if isinstance(rec.get("swipe_id"), int) else 0
        meta["swipes"], meta["swipe_id"] = list(swipes), min(max(sid, 0), len(swipes) - 1)
    when = rec.get("send_date")
    created = _parse_time(when, "send_date", line=n, strict=False) if when else None
    return {"role": role, "content": mes, "created_at": created, "metadata": meta}


def _check_count(n: int) -> None:
    if n > MAX_IMPORT_MESSAGES:
        raise ChatFileError(
            f"{n} messages is more than one import takes ({MAX_IMPORT_MESSAGES}); split the chat", field="messages"
        )


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _parse_time(value: Any, name: str, *, line: int | None = None, strict: bool = True) -> str | None:
    """ISO-8601 UTC text for an ISO string, epoch seconds/milliseconds or SillyTavern's own formats.

    `strict=False` (SillyTavern dates, written by many versions in many locales): unknown -> None,
    the import time is used instead of refusing the whole chat.
    """
    dt: datetime | None = None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            secs = value / 1000 if value > 1e11 else value  # milliseconds (JavaScript Date.now())
            dt = datetime.fromtimestamp(secs, timezone.utc)
        elif isinstance(value, str):
            dt = _parse_time_text(value.strip())
        if dt is not None and dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        text = dt.astimezone(timezone.utc).isoformat(timespec="microseconds") if dt is not None else None
    except (OverflowError, OSError, ValueError):  # year 10000, 1e308 seconds, ...
        text = None
    if text is None:
        if strict:
            raise ChatFileError(
                f"{name}: {value!r} is not a time; use ISO-8601 such as 2024-05-01T12:00:00Z", line=line, field=name
            )
        return None
    return text


def _parse_time_text(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        pass
    for fmt in (ST_SEND_DATE, ST_CREATE_DATE):
        try:
            return datetime.strptime(text.upper() if fmt == ST_SEND_DATE else text, fmt)
        except ValueError:
            continue
    return None


# ---------------------------------------------------------------- export


_ST_ROLES = {0: "system", 1: "user", 2: "assistant"}


def authors_note_from(chat_meta: dict[str, Any]) -> dict[str, Any] | None:
    """SillyTavern's per-chat author's note as Memento's `authors_note` ({text, depth, every, role})."""
    text = chat_meta.get("note_prompt")
    if not isinstance(text, str) or not text.strip():
        return None

    def number(key: str, default: int, low: int) -> int:
        v = chat_meta.get(key)
        return min(max(int(v), low), 1000) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    every = number("note_interval", 1, 0) or 1  # SillyTavern: 0 = never; imported as always, the note was written
    note_role = chat_meta.get("note_role")
    role = _ST_ROLES.get(note_role, "system") if isinstance(note_role, int) else "system"
    return {"text": text[:32_000], "depth": number("note_depth", 4, 0), "every": every, "role": role}


def authors_note_to(note: dict[str, Any]) -> dict[str, Any]:
    roles = {v: k for k, v in _ST_ROLES.items()}
    return {"note_prompt": note.get("text", ""), "note_depth": note.get("depth", 4),
            "note_interval": note.get("every", 1), "note_role": roles.get(note.get("role", "system"), 0)}


def st_date(iso: str) -> str:
    """SillyTavern's send_date text ("June 19, 2023 4:13pm") for a stored ISO time."""
    dt = datetime.fromisoformat(iso)
    return f"{dt.strftime('%B')} {dt.day}, {dt.year} {int(dt.strftime('%I'))}:{dt.strftime('%M')}{dt.strftime('%p').lower()}"


def export_sillytavern(
    messages: list[Any], *, user_name: str, character_name: str, session: Any
) -> str:
    """The transcript as a SillyTavern chat file (JSONL). Memento's ids and metadata ride in
    `extra.memento` (SillyTavern keeps unknown `extra` keys), so a re-import restores them."""
    created = datetime.fromisoformat(session.created_at).strftime(ST_CREATE_DATE)
    header: dict[str, Any] = {
        "user_name": user_name,
        "character_name": character_name,
        "create_date": created,
        "chat_metadata": {"memento": {"session_id": session.id, "persona": session.persona, "memory": session.memory}},
    }
    note = session.metadata.get("authors_note")
    if isinstance(note, dict) and note.get("text"):
        header["chat_metadata"].update(authors_note_to(note))
    lines = [json.dumps(header, ensure_ascii=False)]
    for m in messages:
        lines.append(json.dumps(_st_line(m, user_name, character_name), ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _st_line(m: Any, user_name: str, character_name: str) -> dict[str, Any]:
    meta = {k: v for k, v in m.metadata.items() if k not in ("imported", "name", "hidden")}
    extra: dict[str, Any] = {"memento": {"id": m.id, "metadata": meta}}
    if m.role == "system":
        extra["type"] = "narrator"
    name = {"user": user_name, "assistant": character_name}.get(m.role, "System")
    line: dict[str, Any] = {
        "name": m.metadata.get("name") or name,
        "is_user": m.role == "user",
        "is_system": m.role == "system" or bool(m.metadata.get("hidden")),
        "send_date": st_date(m.created_at),
        "mes": m.content,
        "extra": extra,
    }
    if m.role == "assistant":
        swipes = m.metadata.get("swipes")
        line["swipes"] = list(swipes) if isinstance(swipes, list) and swipes else [m.content]
        line["swipe_id"] = int(m.metadata.get("swipe_id", 0)) if swipes else 0
    return line
