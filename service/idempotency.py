"""Idempotent turns: an `Idempotency-Key` header (or `message_id` in the body) names the user message.

The key becomes the stored user message's id (the stores already treat an append with a known
`message_id` as a no-op), and the reply records `reply_to: <key>` in its metadata. A retry then:

    reply stored              -> that reply, no second generation
    the first try is running  -> waits for it (this session's one-turn claim) and returns its reply
    user turn stored, no reply (the first try died mid-generation) -> generates the reply once,
                                 from the history before that user message
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

from memory.types import Message
from service.errors import APIError

KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
WAIT_POLL = 0.1  # seconds between looks at the store while the first try runs


def check_key(key: str | None, param: str) -> str | None:
    if key is None:
        return None
    if not KEY_RE.match(key):
        raise APIError(422, f"{param} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                       param=param, code="invalid_value")
    return key


def find(messages: list[Message], key: str) -> tuple[int | None, Message | None]:
    """(index of the user message with id `key`, the reply to it) in a transcript."""
    at = next((i for i, m in enumerate(messages) if m.id == key), None)
    if at is None:
        return None, None
    if messages[at].role != "user":
        raise APIError(409, f"message id {key!r} is taken by a {messages[at].role} message in this session",
                       param="Idempotency-Key", code="idempotency_key_reused")
    reply = next((m for m in messages[at + 1:] if m.role == "assistant" and m.metadata.get("reply_to") == key), None)
    return at, reply


async def wait_for_reply(
    rt: Any, session_id: str, key: str, content: str
) -> tuple[list[Message], int | None, Message | None, Callable[[], None] | None]:
    """Look up `key`; while a turn holds the session's claim (maybe the first try, not yet stored), wait.

    Returns (transcript, index of the user message or None, the stored reply or None, claim). With no
    reply, `claim` is this session's one-turn claim, held: the caller starts its turn with it
    (`start_turn(..., claim=claim)`) or releases it. Handing over the claim that found the session
    free, rather than releasing it and claiming again, is what keeps two concurrent tries of one key
    from both seeing it free (or each seeing the other's brief look as a running turn)."""
    deadline = time.monotonic() + rt.settings.request_timeout
    while True:
        messages, at, reply = await _look(rt, session_id, key, content)
        if reply is not None:
            return messages, at, reply, None
        claim = await asyncio.to_thread(rt.in_flight.claim, session_id)  # a store call: off the event loop
        if claim is not None:  # nothing running: a new key, or the first try died before its reply
            try:  # the first try may have stored its reply and finished between our look and our claim
                messages, at, reply = await _look(rt, session_id, key, content)
            except BaseException:
                await asyncio.to_thread(claim)
                raise
            if reply is not None:
                await asyncio.to_thread(claim)
                return messages, at, reply, None
            return messages, at, None, claim
        if time.monotonic() > deadline:
            raise APIError(504, "timed out waiting for the first try of this Idempotency-Key", code="timeout")
        await asyncio.sleep(WAIT_POLL)


async def _look(rt: Any, session_id: str, key: str, content: str) -> tuple[list[Message], int | None, Message | None]:
    """The transcript, where `key`'s user message is and its reply; 409 if the key names other content."""
    messages = await asyncio.to_thread(rt.store.list_messages, session_id)
    at, reply = find(messages, key)
    if at is not None and messages[at].content != content:
        raise APIError(409, f"Idempotency-Key {key!r} was used for a different message in this session",
                       param="Idempotency-Key", code="idempotency_key_reused")
    return messages, at, reply


def stored_outcome(reply: Message, stream: bool) -> Any:
    """What `start_turn` would give (awaitable: the stream's items, or the TurnResult), from the stored reply."""
    from service.conversation import TurnResult

    usage = reply.metadata.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                            "cached_tokens": 0}
    result = TurnResult(reply.content, reply.metadata.get("finish_reason") or "stop", usage, message=reply,
                        tool_calls=reply.metadata.get("tool_calls"))

    async def items() -> Any:
        yield reply.content
        yield result

    async def outcome() -> Any:
        return items() if stream else result

    return outcome()
