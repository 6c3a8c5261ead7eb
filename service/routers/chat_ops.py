"""Chat operations under `/v1/sessions/{id}/messages/{message_id}/...` (logic: service/chat_ops.py).

    POST   .../{mid}/regenerate          a new reply for the same turn, kept as a swipe
    GET    .../{mid}/swipes              the alternatives and the one shown
    POST   .../{mid}/swipes/{index}      show another alternative
    POST   .../{mid}/continue            extend the last reply
    PATCH  .../{mid}                     edit (the previous text stays in metadata.history)
    DELETE .../{mid}                     delete one message
    POST   .../{mid}/truncate            delete everything after it
    POST   .../{mid}/fork                a new session with the transcript up to it
    POST   /v1/sessions/{id}/greeting    the persona's greeting as the first message, alternates as swipes
    PUT    /v1/sessions/{id}/authors_note   {text, depth, every, role}; DELETE removes it
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service import sse
from service.chat_ops import ChatOps
from service.conversation import Sampling
from service.deps import ConvDep, RuntimeDep, UserDep
from service.errors import APIError
from service.routers.sessions import check_length, message_out, native_stream, session_out, turn_out
from service.schemas import MessageOut, SessionOut, TurnOut
from service.worker import open_stream, run_job

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["chat operations"])
M = "/messages/{message_id}"


class GenerateAgain(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: list[str] | None = Field(None, max_length=4)
    stream: bool = False  # SSE: {"delta"} events (for continue: the new text only), then {"message", "usage"}

    def sampling(self) -> Sampling:
        return Sampling(self.max_tokens, self.temperature, self.top_p, self.seed, [s for s in self.stop or [] if s])


class MessageEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1)


class AuthorsNote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=32_000)
    depth: int = Field(4, ge=0, le=1000, description="messages from the end of the chat (0: after the new one)")
    every: int = Field(1, ge=1, le=1000, description="inserted on every Nth user turn (1: always)")
    role: Literal["system", "user", "assistant"] = "system"


class ForkCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, Any] | None = None


def _busy(session_id: str) -> APIError:
    return APIError(409, f"session {session_id!r} is answering a message; retry when it is done",
                    param="session_id", code="session_busy", headers={"Retry-After": "1"})


def exclusive(conv: Any, session_id: str, user: str, change: Any) -> Any:
    """`change(ops, session)` while no turn runs on the session: an edit, delete or truncate in the
    middle of a generation would land under the reply being written (blocking: run in a thread)."""
    session = conv.get_session(session_id, user)
    release = conv.rt.in_flight.claim(session.id)
    if release is None:
        raise _busy(session_id)
    try:
        return change(ChatOps(conv), session)
    finally:
        release()


async def _again(session_id: str, message_id: str, body: GenerateAgain | None, user: str, conv: Any, rt: Any,
                 cont: bool) -> Any:
    body = body or GenerateAgain()
    ops = ChatOps(conv)
    session = await run_in_threadpool(conv.get_session, session_id, user)
    release = await run_in_threadpool(rt.in_flight.claim, session.id)
    if release is None:
        raise _busy(session_id)
    try:
        prep = await run_in_threadpool(ops.prepare_again, session, message_id, body.max_tokens, cont=cont)
        make = ops.continue_job if cont else ops.regenerate_job
        job = make(session, message_id, prep, body.sampling())
        timeout = rt.settings.request_timeout
        if body.stream:  # the owner is the unit of fair admission and of KV-cache scoping
            items = open_stream(rt.worker, job, keepalive=rt.settings.keepalive_seconds, timeout=timeout,
                                on_done=release, owner=user)
            return sse.response(native_stream(items))
        result = await run_job(rt.worker, job, timeout=timeout, on_done=release, owner=user)
    except BaseException:
        await run_in_threadpool(release)
        raise
    return turn_out(result)


@router.post(M + "/regenerate", response_model=TurnOut)
async def regenerate(session_id: str, message_id: str, user: UserDep, conv: ConvDep, rt: RuntimeDep,
                     body: GenerateAgain | None = None) -> Any:
    """A new reply to the same turn; the previous ones stay as swipes (`metadata.swipes`)."""
    return await _again(session_id, message_id, body, user, conv, rt, cont=False)


@router.post(M + "/continue", response_model=TurnOut)
async def continue_reply(session_id: str, message_id: str, user: UserDep, conv: ConvDep, rt: RuntimeDep,
                         body: GenerateAgain | None = None) -> Any:
    """Extend the last reply where it stopped (its earlier text stays in `metadata.history`)."""
    return await _again(session_id, message_id, body, user, conv, rt, cont=True)


@router.get(M + "/swipes")
async def list_swipes(session_id: str, message_id: str, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def load() -> dict[str, Any]:
        return ChatOps(conv).swipes(conv.get_session(session_id, user), message_id)

    return await run_in_threadpool(load)


@router.post(M + "/swipes/{index}", response_model=MessageOut)
async def choose_swipe(session_id: str, message_id: str, index: int, user: UserDep, conv: ConvDep) -> MessageOut:
    def choose(ops: ChatOps, session: Any) -> Any:
        return ops.choose(session, message_id, index)

    return message_out(await run_in_threadpool(exclusive, conv, session_id, user, choose))


@router.patch(M, response_model=MessageOut)
async def edit_message(session_id: str, message_id: str, body: MessageEdit, user: UserDep, conv: ConvDep,
                       rt: RuntimeDep) -> MessageOut:
    check_length(rt, body.content, "content")

    def edit(ops: ChatOps, session: Any) -> Any:
        return ops.edit(session, message_id, body.content)

    return message_out(await run_in_threadpool(exclusive, conv, session_id, user, edit))


@router.delete(M, status_code=204)
async def delete_message(session_id: str, message_id: str, user: UserDep, conv: ConvDep) -> Response:
    def delete(ops: ChatOps, session: Any) -> None:
        ops.delete(session, message_id)

    await run_in_threadpool(exclusive, conv, session_id, user, delete)
    return Response(status_code=204)


@router.post(M + "/truncate")
async def truncate_after(session_id: str, message_id: str, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def truncate(ops: ChatOps, session: Any) -> int:
        return ops.truncate(session, message_id)

    return {"deleted": await run_in_threadpool(exclusive, conv, session_id, user, truncate), "last_message_id": message_id}


@router.post(M + "/fork", status_code=201, response_model=SessionOut)
async def fork_session(session_id: str, message_id: str, user: UserDep, conv: ConvDep,
                       body: ForkCreate | None = None) -> SessionOut:
    def fork() -> Any:
        return ChatOps(conv).fork(conv.get_session(session_id, user), message_id, body.metadata if body else None)

    return session_out(await run_in_threadpool(fork))


@router.post("/greeting", status_code=201, response_model=MessageOut)
async def greet(session_id: str, user: UserDep, conv: ConvDep) -> MessageOut:
    """Store the persona's greeting as the first message; its alternate greetings are swipes of it."""

    def store(ops: ChatOps, session: Any) -> Any:
        return ops.greet(session)

    return message_out(await run_in_threadpool(exclusive, conv, session_id, user, store))


@router.put("/authors_note", response_model=SessionOut)
async def put_authors_note(session_id: str, body: AuthorsNote, user: UserDep, conv: ConvDep) -> SessionOut:
    """An author's note inserted `depth` messages from the end on every `every`-th user turn."""

    def put() -> Any:
        session = conv.get_session(session_id, user)
        metadata = {**session.metadata, "authors_note": body.model_dump()}
        return conv.store.update_session(session.id, metadata=metadata)

    return session_out(await run_in_threadpool(put))


@router.delete("/authors_note", response_model=SessionOut)
async def delete_authors_note(session_id: str, user: UserDep, conv: ConvDep) -> SessionOut:
    def delete() -> Any:
        session = conv.get_session(session_id, user)
        metadata = {k: v for k, v in session.metadata.items() if k != "authors_note"}
        return conv.store.update_session(session.id, metadata=metadata)

    return session_out(await run_in_threadpool(delete))
