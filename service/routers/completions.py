"""OpenAI-compatible `POST /v1/completions`: plain continuation of prompt text (no chat template).

`prompt` is a string, a list of strings, token ids, or a list of token-id lists; each prompt gets
`n` choices (index = prompt * n + j, seeds seed + j). `echo` puts the prompt text before the
completion; `logprobs: k` returns OpenAI's legacy shape (tokens, token_logprobs, top_logprobs as
{token: logprob}, text_offset). A string prompt starts with BOS when the model has one, as
Hugging Face tokenizers do. Also home of the sampling helpers both OpenAI endpoints share.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service import sse
from service.conversation import Prepared, Sampling, TokenLogprob, TurnResult, sampling_extra
from service.deps import ConvDep, RuntimeDep, UserDep
from service.errors import APIError
from service.routers.sessions import check_length, start_turn, stream_error
from service.routers.tokenize import check_ids
from service.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    PromptTokensDetails,
)
from service.worker import KEEPALIVE

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_CHOICES = 16  # prompts x n per request


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, user: UserDep, conv: ConvDep, rt: RuntimeDep) -> Any:
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported; send the prompt only",
                       param="suffix", code="unsupported_value")
    prompts = prompt_ids(rt, body.prompt)
    n = body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most {MAX_CHOICES}",
                       param="n", code="invalid_value")
    extra = sampling_extra(rt.tokenizer.vocab_size, body.presence_penalty, body.frequency_penalty, body.logit_bias, body.logprobs)
    runs = []
    for ids in prompts:
        for j in range(n):
            sampling = Sampling(body.max_tokens, body.temperature, body.top_p, seeded(body.seed, j),
                                body.stop_list(), extra=extra)
            runs.append((ids, sampling))
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": rt.model_name}
    echo = [rt.tokenizer.decode(ids) if body.echo else "" for ids, _ in runs]
    if body.stream:
        streams = [await start_raw(rt, conv, ids, s, stream=True, owner=user) for ids, s in runs]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.response(completion_stream(rt, merge(streams), meta, echo, include_usage))
    results = await asyncio.gather(*(start_raw(rt, conv, ids, s, stream=False, owner=user) for ids, s in runs))
    choices = [completion_choice(rt, i, r, echo[i], body.logprobs) for i, r in enumerate(results)]
    return JSONResponse(Completion(**meta, choices=choices, usage=total_usage(results)).model_dump())


def prompt_ids(rt: Any, prompt: str | list[Any]) -> list[list[int]]:
    """Each prompt as token ids; 400 naming the bad one."""
    tok = rt.tokenizer
    items: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    if items and all(isinstance(x, int) for x in items):
        items = [items]
    if not items:
        raise APIError(400, "prompt is empty: send text or token ids", param="prompt", code="invalid_value")
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            check_length(rt, item, param)
            ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(item)
        else:
            check_ids(item, tok.vocab_size, param)
            ids = list(item)
        if not ids:
            raise APIError(400, f"{param} is empty: the model needs at least one token to continue",
                           param=param, code="invalid_value")
        if len(ids) >= rt.context_window:
            raise APIError(400, f"{param} is {len(ids)} tokens; the context window is {rt.context_window}",
                           param=param, code="context_length_exceeded")
        out.append(ids)
    return out


def seeded(seed: int | None, j: int) -> int | None:
    """Choice j's seed: seed + j (wrapping inside int64), so n choices differ yet repeat."""
    if seed is None:
        return None
    return (seed + j + 2**63) % 2**64 - 2**63


async def start_raw(rt: Any, conv: Any, ids: list[int], sampling: Sampling, *, stream: bool, owner: str = "") -> Any:
    """A continuation of `ids` on the worker: no persona, no template, no memory."""
    limit = max(1, min(sampling.max_tokens or rt.settings.max_tokens, rt.context_window - len(ids)))

    def prepare() -> Prepared:
        return Prepared(messages=[], prompt=rt.backend.raw(ids), max_tokens=limit, persona=None)

    return await start_turn(rt, conv, None, prepare, sampling, stream, owner=owner)


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, item) from several streams as they arrive; KEEPALIVE only when all are quiet."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, items: AsyncIterator[Any]) -> None:
        try:
            async for item in items:
                await queue.put((i, item))
        except Exception as exc:  # noqa: BLE001 - travels to the consumer
            await queue.put((i, exc))
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_ = len(tasks)
    try:
        while open_:
            i, item = await queue.get()
            if item is done:
                open_ -= 1
            elif isinstance(item, Exception):
                raise item
            elif item is not KEEPALIVE or len(streams) == 1:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()


def completion_choice(rt: Any, i: int, r: TurnResult, echo: str, logprobs: int | None) -> CompletionChoice:
    lp = legacy_logprobs(rt.tokenizer, r.token_logprobs, len(echo)) if logprobs is not None else None
    return CompletionChoice(finish_reason=r.openai_finish_reason(), index=i, logprobs=lp, text=echo + r.text)


def legacy_logprobs(tok: Any, scored: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for s in scored:
        out.tokens.append(tok.decode([s.token_id]))
        out.token_logprobs.append(s.logprob)
        out.top_logprobs.append({tok.decode([t]): lp for t, lp in s.top})
        out.text_offset.append(offset)
        offset += len(s.text)
    return out


def total_usage(results: list[TurnResult]) -> CompletionUsage:
    prompt = sum(r.usage["prompt_tokens"] for r in results)
    completion = sum(r.usage["completion_tokens"] for r in results)
    cached = sum(r.usage["cached_tokens"] for r in results)
    return CompletionUsage(completion_tokens=completion, prompt_tokens=prompt, total_tokens=prompt + completion,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def completion_stream(rt: Any, items: AsyncIterator[tuple[int, Any]], meta: dict[str, Any], echo: list[str],
                            include_usage: bool) -> AsyncIterator[bytes]:
    """`text_completion` chunks: text per choice (echo first), one finish_reason per choice, usage, [DONE]."""

    def chunk(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> bytes:
        return sse.event(Completion(**meta, choices=choices, usage=usage).model_dump(exclude_none=not include_usage))

    results: list[TurnResult] = []
    offsets = [len(e) for e in echo]
    for i, text in enumerate(echo):
        if text:
            yield chunk([CompletionChoice(finish_reason=None, index=i, text=text)])
    try:
        async for i, item in items:
            if item is KEEPALIVE:
                yield sse.KEEPALIVE
            elif isinstance(item, str):
                yield chunk([CompletionChoice(finish_reason=None, index=i, text=item)])
            elif isinstance(item, TokenLogprob):
                lp = legacy_logprobs(rt.tokenizer, [item], offsets[i])
                offsets[i] += len(item.text)
                yield chunk([CompletionChoice(finish_reason=None, index=i, text=item.text, logprobs=lp)])
            else:
                results.append(item)
                yield chunk([CompletionChoice(finish_reason=item.openai_finish_reason(), index=i, text="")])
        if include_usage:
            yield chunk([], usage=total_usage(results))
    except Exception as exc:  # headers are sent: the error can only travel in the stream
        yield sse.event(stream_error(exc))
    yield sse.DONE
