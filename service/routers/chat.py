"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`.

Memory mode: a session id in header `X-Session-ID` (or body `session_id`) makes the last user
message the new turn of that session (created if unknown); earlier client messages are ignored.
Without one the call is stateless. A persona comes from header `X-Persona` or body `persona`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from memory.types import Session
from service import sse
from service.client_messages import chat_messages, logit_bias
from service.conversation import Conversations, Prepared, Sampling, TurnResult
from service.deps import ConvDep, RuntimeDep, UserDep
from service.errors import APIError, not_found
from service.routers.sessions import check_length, start_turn, stream_error
from service.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    CompletionUsage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
)
from service.worker import KEEPALIVE

router = APIRouter(prefix="/v1", tags=["openai"])

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ROLE_MAP = {"developer": "system", "tool": "user"}  # roles chat templates know


@router.get("/models", response_model=ModelList)
async def list_models(rt: RuntimeDep, user: UserDep) -> ModelList:
    card = ModelCard(id=rt.lm.name, created=int(rt.started_at), context_window=rt.context_window)
    return ModelList(data=[card])


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, user: UserDep, conv: ConvDep, rt: RuntimeDep
) -> Any:
    session_id = request.headers.get("x-session-id") or body.session_id
    first_used = len(body.messages) - 1 if session_id else 0  # memory mode reads only the last message
    for i in range(first_used, len(body.messages)):
        check_length(rt, body.messages[i].text(), f"messages[{i}].content")
    persona = request.headers.get("x-persona") or body.persona
    limit = body.reply_limit()
    sampling = Sampling(limit, body.temperature, body.top_p, body.seed, body.stop_list())
    if body.logit_bias:
        sampling.extra["logit_bias"] = logit_bias(body.logit_bias, rt.tokenizer.vocab_size)
    if session_id:
        session = await run_in_threadpool(session_for, conv, body, user, session_id, persona)
        text = body.messages[-1].text()

        def prepare() -> Prepared:
            return conv.prepare(session, text, persona_name=persona, max_tokens=limit)

    else:
        session = None
        messages = chat_messages(body.messages)  # several/mid-chat system messages, names (SillyTavern)

        def prepare() -> Prepared:
            return conv.prepare_stateless(messages, persona_name=persona, max_tokens=limit)

    outcome = await start_turn(rt, conv, session.id if session else None, prepare, sampling, bool(body.stream))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": rt.lm.name}
    headers = {"X-Session-ID": session.id} if session is not None else {}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.response(openai_stream(outcome, meta, include_usage), headers=headers)
    result: TurnResult = outcome
    completion = ChatCompletion(
        **meta,
        choices=[Choice(finish_reason=result.openai_finish_reason(), message=ChatCompletionMessage(content=result.text))],
        usage=openai_usage(result),
        session_id=session.id if session is not None else None,
    )
    return JSONResponse(completion.model_dump(exclude={"session_id"} if session is None else None), headers=headers)


def session_for(
    conv: Conversations, body: ChatCompletionRequest, user: str, session_id: str, persona: str | None
) -> Session:
    """Memory mode: the caller's session `session_id`, created if unknown; 404 if someone else's."""
    if not SESSION_ID_RE.match(session_id):
        raise APIError(
            422,
            "session id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
            param="session_id",
            code="invalid_value",
        )
    last = body.messages[-1]
    if last.role != "user":
        raise APIError(
            422,
            f"in memory mode the last message is the new turn and must have role 'user' (got {last.role!r})",
            param=f"messages[{len(body.messages) - 1}].role",
            code="invalid_value",
        )
    session = conv.store.get_session(session_id)
    if session is None:
        return conv.create_session(user, persona, None, {"created_by": "chat.completions"}, session_id=session_id)
    if session.owner != user:
        raise not_found("session", session_id)  # someone else's: indistinguishable from missing
    return session


def openai_usage(result: TurnResult) -> CompletionUsage:
    u = result.usage
    return CompletionUsage(
        completion_tokens=u["completion_tokens"],
        prompt_tokens=u["prompt_tokens"],
        total_tokens=u["total_tokens"],
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u["cached_tokens"]),
    )


async def openai_stream(items: AsyncIterator[Any], meta: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """Chunks as OpenAI sends them: a role chunk, content chunks, a finish chunk, an optional
    usage chunk (empty `choices`), then [DONE]."""

    def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> bytes:
        data = ChatCompletionChunk(**meta, choices=choices, usage=usage).model_dump(exclude_none=not include_usage)
        return sse.event(data)

    yield chunk([ChunkChoice(delta=ChoiceDelta(role="assistant", content=""))])
    try:
        async for item in items:
            if item is KEEPALIVE:
                yield sse.KEEPALIVE
            elif isinstance(item, str):
                yield chunk([ChunkChoice(delta=ChoiceDelta(content=item))])
            else:
                yield chunk([ChunkChoice(delta=ChoiceDelta(), finish_reason=item.openai_finish_reason())])
                if include_usage:
                    yield chunk([], usage=openai_usage(item))
    except Exception as exc:  # headers are sent: the error can only travel in the stream
        yield sse.event(stream_error(exc))
    yield sse.DONE
