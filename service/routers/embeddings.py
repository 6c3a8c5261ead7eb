"""OpenAI-compatible `POST /v1/embeddings` with the configured embedding model (`MEMENTO_EMBEDDINGS`).

The embedder is memory's own process-wide instance (`memory.embeddings.get_embedder`), so a vector
from this endpoint is exactly the vector vector memory stores and searches with. Token-id inputs
are decoded with the chat model's tokenizer first (the embedder tokenizes text itself); `usage`
counts the inputs in the chat model's tokens, since the embedders do not report theirs.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import RuntimeDep, UserDep
from service.errors import APIError
from service.routers.sessions import check_length
from service.routers.tokenize import check_ids
from service.schemas import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_INPUTS = 256  # inputs per request: one call embeds them in one batch


@router.post("/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, rt: RuntimeDep, user: UserDep) -> EmbeddingList:
    from memory.embeddings import get_embedder

    embedder = get_embedder(rt.settings.embeddings)
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise APIError(400, f"dimensions={body.dimensions}: {embedder.name} gives {embedder.dim}-dimensional "
                       "vectors and cannot shorten them; omit 'dimensions'", param="dimensions", code="invalid_value")
    texts = input_texts(rt, body.input)
    vectors = await run_in_threadpool(embedder.embed, texts)
    tokens = sum(rt.tokenizer.count(t) for t in texts)
    data = [Embedding(embedding=encode(v, body.encoding_format), index=i) for i, v in enumerate(vectors)]
    return EmbeddingList(data=data, model=embedder.name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def input_texts(rt: Any, given: str | list[Any]) -> list[str]:
    """The texts to embed: a string, strings, token ids or lists of token ids (decoded)."""
    items: list[Any] = [given] if isinstance(given, str) else list(given)
    if items and all(isinstance(x, int) for x in items):
        items = [items]  # one input given as token ids
    if not items:
        raise APIError(400, "input is empty: send a string or a list of strings", param="input", code="invalid_value")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"input has {len(items)} items; at most {MAX_INPUTS} per request",
                       param="input", code="invalid_value")
    texts = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            check_ids(item, rt.tokenizer.vocab_size, f"input[{i}]")
            item = rt.tokenizer.decode(item)
        if not item:
            raise APIError(400, f"input[{i}] is empty: every input must have text", param=f"input[{i}]",
                           code="invalid_value")
        check_length(rt, item, f"input[{i}]")
        texts.append(item)
    return texts


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
