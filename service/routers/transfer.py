"""Chat import and export: `POST /v1/sessions/{id}/import`, `GET /v1/sessions/{id}/export`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import ConvDep, RuntimeDep, UserDep
from service.errors import APIError
from service.transfer import Transfers

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

MAX_IMPORT_BYTES = 64 * 1024 * 1024  # a long chat, not a disk


@router.post(
    "/{session_id}/import",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"type": "object", "properties": {"messages": {"type": "array"}}}},
                "application/jsonl": {"schema": {"type": "string"}},
            },
            "required": True,
        }
    },
)
async def import_chat(session_id: str, request: Request, user: UserDep, conv: ConvDep, rt: RuntimeDep) -> dict[str, Any]:
    """Store `{"messages": [{role, content, created_at?}]}` or a SillyTavern chat (JSONL) without
    generating; an unknown id creates the session. The memory is built in the background:
    `GET /v1/sessions/{id}` shows `memory_status.pending` going to 0."""
    body = await request.body()
    if len(body) > MAX_IMPORT_BYTES:
        raise APIError(413, f"the chat is {len(body)} bytes; the limit is {MAX_IMPORT_BYTES}", param="body", code="chat_too_large")
    transfers = Transfers(conv)
    session = await run_in_threadpool(transfers.session_for_import, session_id, user)
    release = await run_in_threadpool(rt.in_flight.claim, session.id)
    if release is None:
        raise APIError(409, f"session {session_id!r} is answering a message; import when it is done",
                       param="session_id", code="session_busy", headers={"Retry-After": "1"})
    try:
        return await run_in_threadpool(transfers.import_chat, session, body)
    finally:
        await run_in_threadpool(release)


@router.get("/{session_id}/export")
async def export_chat(session_id: str, user: UserDep, conv: ConvDep) -> Response:
    """The transcript as a SillyTavern chat file (JSONL), swipes included."""

    def export() -> str:
        return Transfers(conv).export(conv.get_session(session_id, user))

    text = await run_in_threadpool(export)
    headers = {"Content-Disposition": f'attachment; filename="{_safe(session_id)}.jsonl"'}
    return Response(text, media_type="application/jsonl; charset=utf-8", headers=headers)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "chat"
