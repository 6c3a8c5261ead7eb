"""Importing and exporting a session's chat, and building the memory of an imported one.

    t = Transfers(conv)
    t.import_chat(session, body)   # stores every message at once (no generation), schedules the build
    t.memory_status(session)       # {"pending", "imported", "done", "state", "strategy", "error"?}
    t.export(session)              # SillyTavern JSONL

The build runs on the background memory thread: the session's strategy folds/indexes the imported
history the way it would have live, `after_turn` on growing prefixes of the transcript,
`BUILD_CHUNK` messages at a time, so a summary strategy summarises in steps and `vector` embeds
each exchange once. Progress is the store state `import` = {"start", "imported", "done", "state"};
`done` moves after each chunk, so after a restart the build resumes where it stopped (the next
`GET /v1/sessions/{id}` reschedules it) and `pending` always tells how many imported messages
are not yet in the memory.
"""

from __future__ import annotations

import logging
from typing import Any

from memory.types import Session
from service.chat_files import ChatFileError, authors_note_from, export_sillytavern, parse_chat
from service.errors import APIError

log = logging.getLogger("memento.transfer")

STATE_KEY = "import"
BUILD_CHUNK = 20  # messages folded/indexed per step (ten exchanges)


class Transfers:
    def __init__(self, conv: Any):
        self.conv = conv
        self.rt = conv.rt
        self.store = conv.store

    # ------------------------------------------------------------------ import

    def session_for_import(self, session_id: str, owner: str) -> Session:
        """The caller's session, created (default persona and memory) when the id is new."""
        from memory.store import SessionExists
        from service.routers.chat import SESSION_ID_RE

        session = self.store.get_session(session_id, owner=owner)
        if session is not None:
            return session
        if not SESSION_ID_RE.match(session_id):
            raise APIError(422, "a new session id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                           param="session_id", code="invalid_value")
        try:
            return self.conv.create_session(owner, session_id=session_id)
        except SessionExists:  # someone else's id: the same 404 as every other route
            return self.conv.get_session(session_id, owner)

    def import_chat(self, session: Session, body: bytes) -> dict[str, Any]:
        try:
            chat = parse_chat(body)
        except ChatFileError as exc:
            raise APIError(422, f"cannot import the chat: {exc}", param=exc.field or "body", code="invalid_chat") from exc
        except UnicodeDecodeError:
            raise APIError(422, "the chat is not UTF-8 text", param="body", code="invalid_chat") from None
        if not chat.messages:
            raise APIError(422, "the chat has no messages to import", param="messages", code="invalid_chat")
        limit = self.rt.settings.max_message_chars
        for i, m in enumerate(chat.messages):
            if len(m["content"]) > limit:
                raise APIError(
                    413, f"message {i} is {len(m['content'])} characters; the limit is {limit} "
                    "(MEMENTO_MAX_MESSAGE_CHARS)", param=f"messages.{i}.content", code="message_too_long",
                )
        start = len(self.store.list_messages(session.id))
        stored = self.store.append_messages(session.id, chat.messages)
        note = authors_note_from(chat.metadata)
        if note is not None:  # SillyTavern's author's note for this chat
            self.store.update_session(session.id, metadata={**session.metadata, "authors_note": note})
        state = {"start": start, "imported": len(stored), "done": 0, "state": "building"}
        previous = self.store.get_state(session.id, STATE_KEY)
        if previous and previous.get("state") == "building":  # an earlier import still building: one range
            state = {**previous, "imported": previous["imported"] + len(stored)}
        self.store.put_state(session.id, STATE_KEY, state)
        self.schedule_build(session.id)
        return {
            "session_id": session.id,
            "format": chat.format,
            "imported": len(stored),
            "first_message_id": stored[0].id,
            "last_message_id": stored[-1].id,
            "memory_status": status_of(state, session),
        }

    # ------------------------------------------------------------------ the memory build

    def schedule_build(self, session_id: str) -> None:
        self.rt.background.submit(("import", session_id), lambda: self.build(session_id))

    def build(self, session_id: str) -> None:
        """Fold/index the imported range chunk by chunk, saving progress after each (background thread)."""
        session = self.store.get_session(session_id)
        state = self.store.get_state(session_id, STATE_KEY) if session is not None else None
        if session is None or not state or state.get("state") != "building":
            return
        strategy = self.conv.strategy(session)
        try:
            while state["done"] < state["imported"]:
                messages = self.store.list_messages(session_id)
                done = min(state["done"] + BUILD_CHUNK, state["imported"])
                upto = min(state["start"] + done, len(messages))
                strategy.after_turn(session, messages[:upto])
                state = {**state, "done": done}
                if done >= state["imported"]:
                    state["state"] = "ready"
                self.store.put_state(session_id, STATE_KEY, state)
        except Exception as exc:  # the transcript is safe; the status says what failed, a later GET retries
            log.exception("memory build of imported session %s failed", session_id)
            self.store.put_state(session_id, STATE_KEY, {**state, "state": "failed", "error": f"{type(exc).__name__}: {exc}"})

    def memory_status(self, session: Session) -> dict[str, Any]:
        state = self.store.get_state(session.id, STATE_KEY)
        if state and state.get("state") in ("building", "failed"):
            if state.get("state") == "failed":  # retry once asked again (Chroma back, ...)
                self.store.put_state(session.id, STATE_KEY, {k: v for k, v in state.items() if k != "error"} | {"state": "building"})
            self.schedule_build(session.id)  # resumes after a restart; a no-op while one is queued
        return status_of(state, session)

    # ------------------------------------------------------------------ export

    def export(self, session: Session) -> str:
        from persona.prompt import user_name_for

        persona, _ = self.conv.session_persona(session, None)
        messages = self.store.list_messages(session.id)
        return export_sillytavern(
            messages, user_name=user_name_for(persona), character_name=persona.char, session=session
        )


def status_of(state: dict[str, Any] | None, session: Session) -> dict[str, Any]:
    strategy = session.memory.get("strategy", "")
    if not state:
        return {"pending": 0, "imported": 0, "done": 0, "state": "ready", "strategy": strategy}
    out = {
        "pending": max(0, state["imported"] - state["done"]),
        "imported": state["imported"],
        "done": state["done"],
        "state": state["state"],
        "strategy": strategy,
    }
    if state.get("error"):
        out["error"] = state["error"]
    return out
