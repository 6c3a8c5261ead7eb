"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`.

Memory mode: a session id in header `X-Session-ID` (or body `session_id`) makes the last user
message the new turn of that session (created if unknown); earlier client messages are ignored.
Without one the call is stateless. A persona comes from header `X-Persona` or body `persona`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from memory.store import SessionExists
from memory.types import Session
from model.presets import preset_for
from service import idempotency, sse
from service.client_messages import chat_messages, logit_bias
from service.conversation import Conversations, Prepared, Sampling, TurnResult
from service.deps import ConvDep, RuntimeDep, UserDep
from service.errors import APIError, not_found
from service.routers.completions import merge, seeded, total_usage
from service.routers.sessions import check_length, start_turn, stream_error
from service.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionUsage,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
)
from service.structured import (
    ConstraintFactory,
    ReplyRepetitionPenalty,
    check_grammar,
    response_format_grammar,
)
from service.tools import HERMES, CallFormat, CallStream, ToolPlan
from service.tools import history as tool_history
from service.worker import KEEPALIVE

router = APIRouter(prefix="/v1", tags=["openai"])

CONSTRAINED_REPETITION_PENALTY = 1.1  # HF semantics over the reply's own tokens; see constrained_penalty
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
ROLE_MAP = {"developer": "system", "tool": "user"}  # roles chat templates know


@router.get("/models", response_model=ModelList)
async def list_models(rt: RuntimeDep, user: UserDep) -> ModelList:
    card = ModelCard(id=rt.model_name, created=int(rt.started_at), context_window=rt.context_window,
                     sampling=preset_for(rt.model_name) or None)
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
    native_ok = rt.backend.capabilities.token_ids  # we render the prompt, so a template's tools section can apply
    plan = await run_in_threadpool(output_plan, body, rt.tokenizer, sampling, native_ok)  # tools / response_format
    sampling.extra.update(chat_sampling_extra(body))
    n = body.n or 1
    if session_id and n > 1:
        raise APIError(422, "n > 1 is for stateless calls: a session stores one reply per turn",
                       param="n", code="invalid_value")
    body.messages = tool_history(body.messages, plan.format if plan else HERMES)  # tool traffic as text
    stored = None  # memory mode with an Idempotency-Key already answered: that reply, no new turn
    if session_id:
        session = await run_in_threadpool(session_for, conv, body, user, session_id, persona)
        text = body.messages[-1].text()
        key = idempotency.check_key(request.headers.get("idempotency-key"), "Idempotency-Key")
        history, claim = None, None
        if key is not None:  # with no stored reply, `claim` is the session's turn claim, held for start_turn
            transcript, at, stored, claim = await idempotency.wait_for_reply(rt, session.id, key, text)
            history = transcript[:at] if at is not None and stored is None else None

        def prepare() -> Prepared:
            prep = conv.prepare(session, text, persona_name=persona, max_tokens=limit, history=history)
            prep = with_tools(conv, prep, plan, limit)
            prep.message_id = key
            return prep

    else:
        session, claim = None, None
        messages = chat_messages(body.messages)  # several/mid-chat system messages, names (SillyTavern)

        def prepare() -> Prepared:
            return conv.prepare_stateless(plan.render(messages) if plan else messages, persona_name=persona,
                                          max_tokens=limit, owner=user, tools=plan and plan.template_tools)

    sid = session.id if session else None
    outcomes = []
    for j in range(n if stored is None else 0):  # n choices: seeds seed + j; the scheduler batches them
        choice_sampling = replace(sampling, seed=seeded(sampling.seed, j))
        outcomes.append(start_turn(rt, conv, sid, prepare, choice_sampling, bool(body.stream), owner=user,
                                   claim=claim))
    if stored is not None:
        outcomes.append(idempotency.stored_outcome(stored, bool(body.stream)))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": rt.model_name}
    headers = {"X-Session-ID": session.id} if session is not None else {}
    call_format = plan.format if plan is not None and plan.mode != "none" else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        streams = await open_all(outcomes)
        return sse.response(openai_stream(merge(streams), meta, include_usage, n, call_format, rt.tokenizer),
                            headers=headers)
    results: list[TurnResult] = list(await asyncio.gather(*outcomes))
    completion = ChatCompletion(
        **meta,
        choices=[chat_choice(i, r, rt.tokenizer, body.logprobs) for i, r in enumerate(results)],
        usage=total_usage(results),
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
        try:
            return conv.create_session(user, persona, None, {"created_by": "chat.completions"}, session_id=session_id)
        except SessionExists:  # a concurrent first call created it: use that one (if it is ours)
            session = conv.store.get_session(session_id)
            if session is None:
                raise
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


async def open_all(outcomes: list[Any]) -> list[Any]:
    """Open every choice's stream; if one is refused (queue full), close the ones already running."""
    streams: list[Any] = []
    try:
        for o in outcomes:
            streams.append(await o)
    except BaseException:
        for s in streams:
            await s.aclose()  # cancels its job
        for o in outcomes[len(streams) + 1:]:
            o.close()  # never started
        raise
    return streams


def output_plan(body: ChatCompletionRequest, tok: Any, sampling: Sampling, native_ok: bool = True) -> ToolPlan | None:
    """Put the request's grammar on `sampling` (tool calls, else response_format); the tool plan."""
    plan = ToolPlan.build(body.tools, body.tool_choice, body.parallel_tool_calls, tok, native_ok=native_ok)
    penalty = constrained_penalty(body)
    if plan is not None and plan.factory is not None:
        sampling.processors = lambda: plan.processors(tok) + penalty
        sampling.tool_parser = plan.parse  # on the worker: memory mode stores the calls with the reply
        return plan
    grammar = response_format_grammar(body.response_format)
    if grammar is not None:
        param = "response_format" if body.response_format.type == "json_object" else "response_format.json_schema.schema"
        check_grammar(grammar, tok, param=param)
        factory = ConstraintFactory(tok, grammar)
        sampling.processors = lambda: [factory()] + penalty
    return plan


def constrained_penalty(body: ChatCompletionRequest) -> list[ReplyRepetitionPenalty]:
    """Under a grammar a small model, greedy, loops inside a JSON string until max_tokens ("the cat
    was a cat, and the cat was a cat, ..."); a mild repetition penalty lets it close the string.
    Over the reply's own tokens only: the engine's `repetition_penalty` counts the prompt too, and
    arguments copy the prompt (SmolLM2-135M asked for magic_function(3) wrote 256; a Japanese
    name came out as other katakana). A presence penalty of 0.5-1.5 did not end the loops.
    Only when the client set no penalty of its own."""
    if body.presence_penalty or body.frequency_penalty or body.repetition_penalty:
        return []
    return [ReplyRepetitionPenalty(CONSTRAINED_REPETITION_PENALTY)]


def with_tools(conv: Conversations, prep: Prepared, plan: ToolPlan | None, limit: int | None) -> Prepared:
    """Memory mode: the context the strategy built, with the tool definitions (the fallback prompt in
    its system message, or the template's tools section). The transcript keeps calls and results as
    text (service/tools.py); a native template gets them back as `tool_calls` / `tool` messages."""
    if plan is None or not plan.changes_prompt:
        return prep
    out = conv._render(plan.render(prep.messages), 0, prep.persona, limit, tools=plan.template_tools)
    out.session, out.new_message, out.ctx, out.remind = prep.session, prep.new_message, prep.ctx, prep.remind
    return out


def chat_sampling_extra(body: ChatCompletionRequest) -> dict[str, Any]:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    extra: dict[str, Any] = {}
    if body.presence_penalty:
        extra["presence_penalty"] = body.presence_penalty
    if body.frequency_penalty:
        extra["frequency_penalty"] = body.frequency_penalty
    if body.logprobs:
        extra["logprobs"] = body.top_logprobs or 0
    extra.update(body.sampler_overrides())  # min_p, top_k, DRY ...: over the model's preset and the persona's
    return extra


def chat_choice(i: int, r: TurnResult, tok: Any, logprobs: bool | None) -> Choice:
    message = ChatCompletionMessage(content=None if r.tool_calls else r.text, tool_calls=r.tool_calls)
    lp = chat_logprobs(tok, r.token_logprobs) if logprobs else None
    return Choice(finish_reason=r.openai_finish_reason(), index=i, logprobs=lp, message=message)


def chat_logprobs(tok: Any, scored: list[Any]) -> ChoiceLogprobs:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tok.decode([token_id]), "bytes": list(tok.token_bytes(token_id)), "logprob": logprob}

    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(s.token_id, s.logprob), top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in s.top])
        for s in scored
    ])


async def openai_stream(items: AsyncIterator[tuple[int, Any]], meta: dict[str, Any], include_usage: bool,
                        n: int = 1, call_format: CallFormat | None = None, tok: Any = None) -> AsyncIterator[bytes]:
    """Chunks as OpenAI sends them: a role chunk per choice, content (or tool-call) chunks, one
    finish chunk per choice, an optional usage chunk (empty `choices`), then [DONE].
    `call_format`: tools are on and calls are written this way."""

    def chunk(choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> bytes:
        data = ChatCompletionChunk(**meta, choices=choices, usage=usage).model_dump(exclude_none=not include_usage)
        return sse.event(data)

    calls = [CallStream(call_format) if call_format else None for _ in range(n)]
    results: list[TurnResult] = []
    for i in range(n):
        yield chunk([ChunkChoice(delta=ChoiceDelta(role="assistant", content=""), index=i)])
    try:
        async for i, item in items:
            if item is KEEPALIVE:
                yield sse.KEEPALIVE
            elif isinstance(item, TurnResult):
                for delta in (calls[i].finish() if calls[i] else []):
                    yield chunk([ChunkChoice(delta=stream_delta(delta), index=i)])
                results.append(item)
                yield chunk([ChunkChoice(delta=ChoiceDelta(), finish_reason=item.openai_finish_reason(), index=i)])
            else:
                text = item if isinstance(item, str) else item.text
                if calls[i] is None:
                    lp = None if isinstance(item, str) else chat_logprobs(tok, [item])
                    yield chunk([ChunkChoice(delta=ChoiceDelta(content=text), index=i, logprobs=lp)])
                    continue
                for delta in calls[i].push(text):
                    yield chunk([ChunkChoice(delta=stream_delta(delta), index=i)])
        if include_usage:
            yield chunk([], usage=total_usage(results))
    except Exception as exc:  # headers are sent: the error can only travel in the stream
        yield sse.event(stream_error(exc))
    yield sse.DONE


def stream_delta(delta: tuple[Any, ...]) -> ChoiceDelta:
    """A CallStream item as an OpenAI delta: content text, or one whole tool call."""
    if delta[0] == "content":
        return ChoiceDelta(content=delta[1])
    _, index, call = delta
    fn = FunctionCallDelta(name=call["function"]["name"], arguments=call["function"]["arguments"])
    return ChoiceDelta(tool_calls=[ToolCallDelta(index=index, id=call["id"], type="function", function=fn)])
