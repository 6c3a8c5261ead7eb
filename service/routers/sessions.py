"""Native sessions API: sessions, their transcripts, a turn (optionally streamed), the context inspector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from memory.types import Message, Session
from service import idempotency, sse
from service.conversation import Prepared, Sampling, TurnResult, sampling_extra
from service.deps import ConvDep, RuntimeDep, UserDep
from service.errors import APIError, error_body
from service.schemas import (
    ContextOut,
    MessageCreate,
    MessageOut,
    SessionCreate,
    SessionOut,
    SessionUpdate,
    TurnOut,
    Usage,
)
from service.worker import KEEPALIVE, open_stream, run_job

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def session_out(s: Session) -> SessionOut:
    return SessionOut(id=s.id, persona=s.persona, memory=s.memory, created_at=s.created_at, metadata=s.metadata)


def message_out(m: Message) -> MessageOut:
    return MessageOut(id=m.id, role=m.role, content=m.content, created_at=m.created_at, metadata=m.metadata)


def check_length(rt: Any, content: str, param: str) -> None:
    limit = rt.settings.max_message_chars
    if len(content) > limit:
        raise APIError(
            413,
            f"{param} is {len(content)} characters; the limit is {limit} (MEMENTO_MAX_MESSAGE_CHARS)",
            param=param,
            code="message_too_long",
        )


@router.post("", status_code=201, response_model=SessionOut)
async def create_session(body: SessionCreate, user: UserDep, conv: ConvDep) -> SessionOut:
    memory = body.memory.as_dict() if body.memory else None
    session = await run_in_threadpool(conv.create_session, user, body.persona, memory, body.metadata)
    return session_out(session)


@router.get("")
async def list_sessions(user: UserDep, conv: ConvDep) -> dict[str, Any]:
    sessions = await run_in_threadpool(conv.store.list_sessions, user)
    return {"object": "list", "data": [session_out(s).model_dump() for s in sessions]}


@router.get("/{session_id}", response_model=SessionOut)
async def get_session(session_id: str, user: UserDep, conv: ConvDep) -> SessionOut:
    from service.transfer import Transfers

    def load() -> SessionOut:
        session = conv.get_session(session_id, user)
        out = session_out(session)
        out.memory_status = Transfers(conv).memory_status(session)  # imported history still building?
        return out

    return await run_in_threadpool(load)


@router.patch("/{session_id}", response_model=SessionOut)
async def update_session(session_id: str, body: SessionUpdate, user: UserDep, conv: ConvDep) -> SessionOut:
    def update() -> Session:
        session = conv.get_session(session_id, user)
        memory = body.memory.as_dict() if body.memory else None
        return conv.update_session(session, persona=body.persona, memory=memory, metadata=body.metadata)

    return session_out(await run_in_threadpool(update))


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, user: UserDep, conv: ConvDep) -> Response:
    def delete() -> None:
        conv.delete_session(conv.get_session(session_id, user))

    await run_in_threadpool(delete)
    return Response(status_code=204)


@router.get("/{session_id}/messages")
async def list_messages(session_id: str, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def load() -> list[Message]:
        conv.get_session(session_id, user)
        return conv.store.list_messages(session_id)

    messages = await run_in_threadpool(load)
    return {"object": "list", "data": [message_out(m).model_dump() for m in messages]}


@router.post("/{session_id}/messages", response_model=TurnOut)
async def post_message(
    session_id: str, body: MessageCreate, user: UserDep, conv: ConvDep, rt: RuntimeDep,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=128),
) -> Any:
    check_length(rt, body.content, "content")
    key = idempotency.check_key(idempotency_key or body.message_id, "Idempotency-Key" if idempotency_key else "message_id")
    sampling = Sampling(body.max_tokens, body.temperature, body.top_p, body.seed, body.stop_list())
    sampling.extra = sampling_extra(rt.tokenizer.vocab_size, body.presence_penalty, body.frequency_penalty, body.logit_bias, None)
    sampling.extra.update(body.sampler_overrides())
    session = await run_in_threadpool(conv.get_session, session_id, user)
    history, claim = None, None
    if key is not None:  # a retry: the stored reply, or the first try's once it finishes
        messages, at, reply, claim = await idempotency.wait_for_reply(rt, session.id, key, body.content)
        if reply is not None:
            return replayed(reply, body.stream)
        history = messages[:at] if at is not None else None  # the user turn is stored: answer it once

    def prepare() -> Prepared:
        prep = conv.prepare(session, body.content, max_tokens=body.max_tokens, history=history)
        prep.message_id = key
        return prep

    outcome = await start_turn(rt, conv, session.id, prepare, sampling, body.stream, owner=user, claim=claim)
    if body.stream:
        return sse.response(native_stream(outcome))
    return turn_out(outcome)


async def start_turn(
    rt: Any, conv: Any, session_id: str | None, prepare: Callable[[], Prepared], sampling: Sampling, stream: bool,
    owner: str = "", claim: Callable[[], None] | None = None,
) -> Any:
    """Prepare off the event loop and submit to the worker: the stream's items, or the TurnResult.
    `owner` (the authenticated user) is the unit of fair admission and of KV-cache scoping.

    One turn per session at a time (`session_id` None: stateless, no claim): a concurrent second
    turn gets 409 rather than interleaving the transcript. The claim (taken here, or `claim`, one
    already held: idempotency.wait_for_reply's) ends with the worker job.
    """
    # the claim and its release are store calls: off the event loop, which a hung store would freeze
    if claim is not None:
        release = claim
    elif session_id is None:
        release = lambda: None  # noqa: E731
    else:
        release = await run_in_threadpool(rt.in_flight.claim, session_id)
    if release is None:
        raise APIError(
            409, f"session {session_id!r} is already answering a message; retry when it is done",
            param="session_id", code="session_busy", headers={"Retry-After": "1"},
        )
    try:
        prep = await run_in_threadpool(prepare)
        job = conv.turn_job(prep, sampling)
        timeout = rt.settings.request_timeout
        if stream:
            if rt.settings.engine_url:  # a remote engine that is down: 503 now, not a 200 carrying an error
                await run_in_threadpool(rt.backend.preflight)
            keepalive = rt.settings.keepalive_seconds
            return open_stream(rt.worker, job, keepalive=keepalive, timeout=timeout, on_done=release, owner=owner)
        return await run_job(rt.worker, job, timeout=timeout, on_done=release, owner=owner)
    except BaseException:
        await run_in_threadpool(release)  # not submitted (or failed): free it now; a second release is harmless
        raise


def replayed(reply: Message, stream: bool) -> Any:
    """A retry's answer: the stored reply, in the shape (and stream form) the first try had."""
    usage = reply.metadata.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                            "cached_tokens": 0}
    out = TurnOut(message=message_out(reply), usage=Usage.model_validate(usage))

    async def events() -> AsyncIterator[bytes]:
        yield sse.event({"delta": reply.content})
        yield sse.event(out.model_dump())
        yield sse.DONE

    return sse.response(events()) if stream else out


def turn_out(result: TurnResult) -> TurnOut:
    assert result.message is not None
    return TurnOut(message=message_out(result.message), usage=result.usage)  # type: ignore[arg-type]


async def native_stream(items: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """`{"delta"}` events, then `{"message", "usage"}`, then [DONE]; an error becomes an `{"error"}` event."""
    try:
        async for item in items:
            if item is KEEPALIVE:
                yield sse.KEEPALIVE
            elif isinstance(item, str):
                yield sse.event({"delta": item})
            else:
                yield sse.event(turn_out(item).model_dump())
    except Exception as exc:  # headers are sent: the error can only travel in the stream
        yield sse.event(stream_error(exc))
    yield sse.DONE


def stream_error(exc: Exception) -> dict[str, Any]:
    from service.errors import as_api_error

    api = as_api_error(exc)
    if api is None:
        import logging

        logging.getLogger("memento").exception("generation failed")
        return error_body(500, f"generation failed: {type(exc).__name__}", code="internal_error")
    return api.body()


@router.get("/{session_id}/context", response_model=ContextOut)
async def get_context(
    session_id: str,
    user: UserDep,
    conv: ConvDep,
    rt: RuntimeDep,
    message: str = Query("", max_length=32_000, description="the next user message, if it were sent (retrieval uses it)"),
) -> dict[str, Any]:
    check_length(rt, message, "message")  # the same limit as a real turn's content

    def build() -> dict[str, Any]:
        return conv.context_view(conv.get_session(session_id, user), message)

    return await run_in_threadpool(build)
