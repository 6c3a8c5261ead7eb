"""Chat operations on a stored transcript: regenerate (swipes), choose a swipe, continue, edit,
delete, truncate, fork. Routes: service/routers/chat_ops.py.

Every change is a store write (durable on return) and visible in the transcript:
- an assistant message with alternatives carries `metadata.swipes` (texts, oldest first),
  `metadata.swipe_id` (the one shown = `content`) and `metadata.swipe_info` (each one's
  finish_reason / usage), the same shape SillyTavern chat files use (service/chat_files.py);
- an edited (or continued) message keeps what it said before in `metadata.history`
  (`[{content, at, op}]`, oldest first);
- a fork is a new session whose transcript is a copy of the first k messages, with
  `metadata.forked_from = {session_id, message_id}`; its first turn shares the parent's KV cache
  (the engine reuses another session's cache when the prompt starts the same).
Derived memory (summaries, the vector index) is rebuilt from the transcript after an edit, delete
or truncate, on the background thread.
"""

from __future__ import annotations

from typing import Any

from memory.types import Message, Session, now_iso
from service.conversation import Conversations, Prepared, Sampling, TurnResult
from service.errors import APIError
from service.worker import Job

MAX_HISTORY = 50  # previous versions kept per message


def find(messages: list[Message], message_id: str) -> int:
    for i, m in enumerate(messages):
        if m.id == message_id:
            return i
    raise APIError(404, f"message {message_id!r} not found in this session", param="message_id", code="not_found")


def with_history(meta: dict[str, Any], old: str, op: str) -> dict[str, Any]:
    earlier: list[Any] = meta["history"] if isinstance(meta.get("history"), list) else []
    history = [*earlier, {"content": old, "at": now_iso(), "op": op}][-MAX_HISTORY:]
    return {**meta, "history": history}


def swipes_of(m: Message) -> tuple[list[str], int]:
    """The message's alternatives and the shown one's index; metadata written by hand (an import)
    that is not a list of texts with an index inside it counts as no swipes."""
    swipes = m.metadata.get("swipes")
    k = m.metadata.get("swipe_id", 0)
    if not (isinstance(swipes, list) and swipes and all(isinstance(s, str) for s in swipes)):
        return [m.content], 0
    if not (isinstance(k, int) and 0 <= k < len(swipes)):
        k = 0
    return list(swipes), k


def swipe_info_of(m: Message, n: int) -> list[dict[str, Any]]:
    info = m.metadata.get("swipe_info")
    if not (isinstance(info, list) and all(isinstance(i, dict) for i in info)):
        info = []
    return (info + [{} for _ in range(n)])[:n]


class ChatOps:
    def __init__(self, conv: Conversations):
        self.conv = conv
        self.store = conv.store
        self.rt = conv.rt

    # ------------------------------------------------------------------ generating again

    def last_reply(self, session: Session, message_id: str) -> tuple[list[Message], int]:
        """The transcript and the index of `message_id`, which must be the last message and a reply
        to a user message (only the newest reply can be regenerated or continued)."""
        messages = self.store.list_messages(session.id)
        i = find(messages, message_id)
        if messages[i].role != "assistant" or i != len(messages) - 1:
            raise APIError(
                409, "only the last message, an assistant reply, can be regenerated or continued; "
                "truncate after the message first to go back further", param="message_id", code="not_last_reply",
            )
        return messages, i

    def prepare_again(self, session: Session, message_id: str, max_tokens: int | None, *, cont: bool) -> Prepared:
        """The prompt that produced the reply `message_id` (+ its text, to continue it)."""
        messages, i = self.last_reply(session, message_id)
        user = next((m for m in reversed(messages[:i]) if m.role == "user"), None)
        if user is None:  # a greeting: answer "the conversation starts"
            from memory.context import CONVERSATION_START

            prep = self.conv.prepare(session, CONVERSATION_START, max_tokens=max_tokens, history=messages[:i])
        else:
            upto = messages.index(user) + 1
            prep = self.conv.prepare(session, user.content, max_tokens=max_tokens, history=messages[:upto])
        prep.new_message = None  # nothing new to store before generating
        if cont:
            prompt = self.rt.backend.extend(prep.prompt, messages[i].content)
            window = self.rt.context_window
            if prompt.tokens >= window - 1:
                raise APIError(400, "the reply is too long to continue within the context window",
                               param="message_id", code="context_length_exceeded")
            prep.prompt = prompt
            prep.max_tokens = max(1, min(prep.max_tokens, window - prompt.tokens))
        return prep

    def regenerate_job(self, session: Session, message_id: str, prep: Prepared, sampling: Sampling) -> Any:
        def run(job: Job) -> TurnResult:
            result = self.conv._generate(job, prep, sampling)
            old = self.store.list_messages(session.id)[-1]
            meta = dict(old.metadata)
            swipes, _ = swipes_of(old)
            info = swipe_info_of(old, len(swipes)) if len(swipes) > 1 else [_info(meta)]
            swipes.append(result.text)
            info.append({"finish_reason": result.finish_reason, "usage": result.usage, **result.register_meta})
            meta.update(info[-1], swipes=swipes, swipe_info=info, swipe_id=len(swipes) - 1)
            result.message = self.store.update_message(session.id, message_id, content=result.text, metadata=meta)
            self.conv.schedule_after_turn(session.id)
            return result

        return run

    def continue_job(self, session: Session, message_id: str, prep: Prepared, sampling: Sampling) -> Any:
        def run(job: Job) -> TurnResult:
            result = self.conv._generate(job, prep, sampling)
            old = self.store.list_messages(session.id)[-1]
            text = old.content + result.text
            meta = with_history(old.metadata, old.content, "continue")
            meta.update(finish_reason=result.finish_reason, continued=int(meta.get("continued", 0)) + 1)
            swipes, k = swipes_of(old)
            if len(swipes) > 1:
                swipes[k] = text
                meta.update(swipes=swipes, swipe_id=k)
            result.message = self.store.update_message(session.id, message_id, content=text, metadata=meta)
            result.text = text
            self.conv.schedule_after_turn(session.id)
            return result

        return run

    # ------------------------------------------------------------------ swipes

    def swipes(self, session: Session, message_id: str) -> dict[str, Any]:
        m = self.store.list_messages(session.id)[find(self.store.list_messages(session.id), message_id)]
        swipes, k = swipes_of(m)
        return {"message_id": m.id, "swipe_id": k, "swipes": swipes}

    def choose(self, session: Session, message_id: str, index: int) -> Message:
        messages = self.store.list_messages(session.id)
        m = messages[find(messages, message_id)]
        swipes, _ = swipes_of(m)
        if not 0 <= index < len(swipes):
            raise APIError(422, f"swipe {index} does not exist: this message has {len(swipes)} (0-{len(swipes) - 1})",
                           param="index", code="invalid_swipe")
        meta = {**m.metadata, "swipe_id": index}
        meta.update(swipe_info_of(m, len(swipes))[index])
        updated = self.store.update_message(session.id, m.id, content=swipes[index], metadata=meta)
        self.rebuild_memory(session.id)
        return updated

    # ------------------------------------------------------------------ editing the transcript

    def edit(self, session: Session, message_id: str, content: str) -> Message:
        messages = self.store.list_messages(session.id)
        m = messages[find(messages, message_id)]
        meta = with_history(m.metadata, m.content, "edit")
        meta["edited"] = True
        swipes, k = swipes_of(m)
        if len(swipes) > 1:
            swipes[k] = content
            meta.update(swipes=swipes, swipe_id=k)
        updated = self.store.update_message(session.id, m.id, content=content, metadata=meta)
        self.rebuild_memory(session.id)
        return updated

    def delete(self, session: Session, message_id: str) -> None:
        find(self.store.list_messages(session.id), message_id)
        self.store.delete_messages(session.id, [message_id])
        self.rebuild_memory(session.id)

    def truncate(self, session: Session, message_id: str) -> int:
        """Delete every message after `message_id` (which stays); returns how many went."""
        messages = self.store.list_messages(session.id)
        i = find(messages, message_id)
        n = self.store.delete_messages(session.id, [m.id for m in messages[i + 1 :]])
        self.rebuild_memory(session.id)
        return n

    def fork(self, session: Session, message_id: str, metadata: dict[str, Any] | None) -> Session:
        """A new session of the same owner, persona and memory with a copy of messages[: k+1]."""
        messages = self.store.list_messages(session.id)
        i = find(messages, message_id)
        meta = {**session.metadata, **(metadata or {}), "forked_from": {"session_id": session.id, "message_id": message_id}}
        child = self.store.create_session(session.owner, session.persona, session.memory, meta)
        items = [
            {"role": m.role, "content": m.content, "created_at": m.created_at,
             "metadata": {**m.metadata, "forked_from": m.id}}
            for m in messages[: i + 1]
        ]
        self.store.append_messages(child.id, items)
        self.conv.schedule_after_turn(child.id)  # the child's own summary / index
        return child

    def greet(self, session: Session) -> Message:
        """The persona's greeting as the first message; `alternate_greetings` are its swipes."""
        from persona.prompt import render_macros, user_name_for

        persona, _ = self.conv.session_persona(session, None)
        if self.store.list_messages(session.id):
            raise APIError(409, "the session already has messages; a greeting opens an empty session",
                           param="session_id", code="not_empty")
        user = user_name_for(persona)
        texts = [render_macros(g.strip(), persona.char, user) for g in [persona.greeting, *persona.alternate_greetings]]
        texts = [t for t in texts if t]
        if not texts:
            raise APIError(422, f"persona {persona.name!r} has no greeting; add `greeting:` to its file",
                           param="persona", code="no_greeting")
        meta: dict[str, Any] = {"greeting": True, "persona": persona.name}
        if len(texts) > 1:
            meta.update(swipes=texts, swipe_id=0)
        return self.store.append_message(session.id, "assistant", texts[0], meta)

    def rebuild_memory(self, session_id: str) -> None:
        """The transcript changed in the past: recompute the derived memory from it (background)."""

        def task() -> None:
            session = self.store.get_session(session_id)
            if session is None:
                return
            strategy = self.conv.strategy(session)
            try:
                strategy.rebuild(session)
            except ValueError:  # vector memory not configured: nothing derived to rebuild
                pass

        self.rt.background.submit(("rebuild", session_id), task)


def _info(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("finish_reason", "usage", "register") if k in meta}
