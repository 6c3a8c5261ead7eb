"""Long-term memory a user can see and fix: core memory blocks of a session, and their facts.

    GET  /v1/sessions/{id}/memory/blocks            every block of the session
    GET  /v1/sessions/{id}/memory/blocks/{label}    one block, with its edit history
    PUT  /v1/sessions/{id}/memory/blocks/{label}    {"value", "limit_tokens"?}: the user's own text
    GET  /v1/memories[?session_id=ID][&current=true]  the user's facts, newest first
    PATCH  /v1/memories/{fact_id}  {"text"}          a correction: supersedes the fact (kept as past)
    DELETE /v1/memories/{fact_id}                    removes the fact

Same auth and ownership rules as sessions: another user's session or fact is a 404.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from memory.blocks import MAX_BLOCK_TOKENS, BlockError, CoreMemory
from memory.facts import FactBook, FactNotFound
from service.deps import ConvDep, UserDep
from service.errors import APIError, not_found

router = APIRouter(tags=["memory"])
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


class BlockPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(max_length=20_000, description="the block's whole text (may be empty)")
    limit_tokens: int | None = Field(None, ge=1, le=MAX_BLOCK_TOKENS, description="size limit in the model's tokens")


class FactCorrection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=2000, description="the corrected fact, in the user's words")

    @field_validator("text")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.strip() or _NOT_TEXT.search(value):
            raise ValueError("must be non-empty text without control characters or lone surrogates")
        return value.strip()


def _core(conv: Any) -> CoreMemory:
    return CoreMemory(conv.store, conv.rt.tokenizer)


def _block_json(core: CoreMemory, session_id: str, label: str, with_history: bool) -> dict[str, Any]:
    block = core.get(session_id, label)
    if block is None:
        raise not_found("block", label, param="label")
    out = {"label": block.label, "value": block.value, "limit_tokens": block.limit_tokens,
           "tokens": core.counter.count(block.value) if block.value else 0, "updated_at": block.updated_at}
    if with_history:
        out["history"] = core.history(session_id, label)
    return out


@router.get("/v1/sessions/{session_id}/memory/blocks")
async def list_blocks(session_id: str, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        session = conv.get_session(session_id, user)
        core = _core(conv)
        data = [_block_json(core, session.id, label, False) for label in core.blocks(session.id)]
        return {"object": "list", "data": data, "edits": core.stats(session.id)}

    return await run_in_threadpool(run)


@router.get("/v1/sessions/{session_id}/memory/blocks/{label}")
async def get_block(session_id: str, label: str, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        session = conv.get_session(session_id, user)
        return _block_json(_core(conv), session.id, label, True)

    return await run_in_threadpool(run)


@router.put("/v1/sessions/{session_id}/memory/blocks/{label}")
async def put_block(session_id: str, label: str, body: BlockPut, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        session = conv.get_session(session_id, user)
        core = _core(conv)
        try:
            core.put(session.id, label, body.value, limit_tokens=body.limit_tokens, source="user")
        except BlockError as exc:
            raise APIError(422, str(exc), param=exc.param, code="invalid_block") from exc
        return _block_json(core, session.id, label, True)

    return await run_in_threadpool(run)


@router.get("/v1/memories")
async def list_memories(
    user: UserDep,
    conv: ConvDep,
    session_id: str | None = Query(None, min_length=1, max_length=200, description="one session's facts"),
    current: bool | None = Query(None, description="true: only facts true now; false: only past ones"),
) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        if session_id is not None:
            conv.get_session(session_id, user)  # 404 for someone else's
        facts = FactBook(conv.store).list_facts(user, session_id)
        if current is not None:
            facts = [f for f in facts if f.current == current]
        return {"object": "list", "data": [f.to_dict() for f in facts]}

    return await run_in_threadpool(run)


@router.patch("/v1/memories/{fact_id}")
async def correct_memory(fact_id: str, body: FactCorrection, user: UserDep, conv: ConvDep) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        at = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            return FactBook(conv.store).correct(user, fact_id, body.text, at=at).to_dict()
        except FactNotFound as exc:
            raise not_found("memory", fact_id, param="fact_id") from exc

    return await run_in_threadpool(run)


@router.delete("/v1/memories/{fact_id}", status_code=204)
async def delete_memory(fact_id: str, user: UserDep, conv: ConvDep) -> Response:
    def run() -> None:
        try:
            FactBook(conv.store).delete(user, fact_id)
        except FactNotFound as exc:
            raise not_found("memory", fact_id, param="fact_id") from exc

    await run_in_threadpool(run)
    return Response(status_code=204)
