"""llama.cpp server's `POST /tokenize` and `POST /detokenize`, in its request and response shapes.

    POST /tokenize   {"content": "Hi", "add_special": false, "parse_special": true, "with_pieces": false}
                  -> {"tokens": [1, 2]}   or, with_pieces: {"tokens": [{"id": 1, "piece": "Hi"}, ...]}
    POST /detokenize {"tokens": [1, 2]} -> {"content": "Hi"}

`piece` is the token's text, or its list of bytes when they are not valid UTF-8 on their own
(half of a multi-byte character), as llama.cpp sends it. Same auth as `/v1`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import RuntimeDep, UserDep
from service.errors import APIError
from service.routers.sessions import check_length
from service.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
)

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, rt: RuntimeDep, user: UserDep) -> TokenizeResponse:
    check_length(rt, body.content, "content")
    ids = await run_in_threadpool(encode, rt.tokenizer, body.content, body.parse_special)
    if body.add_special and rt.tokenizer.bos_id is not None:
        ids = [rt.tokenizer.bos_id] + ids
    if not body.with_pieces:
        return TokenizeResponse(tokens=ids)
    return TokenizeResponse(tokens=[TokenPiece(id=i, piece=piece(rt.tokenizer, i)) for i in ids])


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, rt: RuntimeDep, user: UserDep) -> DetokenizeResponse:
    check_ids(body.tokens, rt.tokenizer.vocab_size, "tokens")
    return DetokenizeResponse(content=rt.tokenizer.decode(body.tokens))


def encode(tok: Any, text: str, parse_special: bool) -> list[int]:
    """Special-token text becomes special only when asked (llama.cpp's parse_special)."""
    if parse_special:
        return list(tok._encode_with_specials(text, []))  # the tokenizer's own split at specials
    return list(tok.encode(text))


def piece(tok: Any, token_id: int) -> str | list[int]:
    raw = tok.token_bytes(token_id)
    if not raw:  # a control token: its name is its text
        return tok.id_to_token(token_id) or ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size]
    if bad:
        i, t = bad[0]
        raise APIError(400, f"{param}[{i}] = {t} is not a token id of this model (0..{vocab_size - 1})",
                       param=f"{param}[{i}]", code="invalid_value")
