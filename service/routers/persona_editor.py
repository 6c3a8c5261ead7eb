"""What the page's persona editor calls (logic: persona/editor.py). Nothing here saves: the
editor saves with `PUT /v1/personas/{name}`.

    POST /v1/persona-drafts/check     body: persona file text -> {ok, persona | error{message, line, field}}
    POST /v1/persona-drafts/render    {fields} -> {text}: the form's fields as a persona file
    POST /v1/persona-drafts/preview   body: persona file text -> {messages, costs, register_flags}
    POST /v1/persona-drafts/card      body: a PNG or JSON card -> {text}
    GET  /v1/personas/{name}/card[?format=json|png]   export (the lorebook included)
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from service.deps import RuntimeDep, UserDep
from service.errors import APIError

router = APIRouter(tags=["persona editor"])
MAX_DRAFT_BYTES = 512 * 1024
MAX_CARD_BYTES = 16 * 1024 * 1024  # PNG cards carry an image


class Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fields: dict[str, Any]


async def _text(request: Request, limit: int = MAX_DRAFT_BYTES) -> str:
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"the draft is {len(raw)} bytes; the limit is {limit}", param="body")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(422, f"the draft is not UTF-8 text ({exc.reason} at byte {exc.start})", param="body") from exc


@router.post("/v1/persona-drafts/check")
async def check_draft(request: Request, user: UserDep, name: str | None = Query(None)) -> dict[str, Any]:
    from persona.editor import check_text

    return check_text(await _text(request), name)


@router.post("/v1/persona-drafts/render")
async def render_draft(body: Fields, user: UserDep) -> dict[str, Any]:
    from persona.editor import text_from_fields

    return {"text": text_from_fields(body.fields)}


@router.post("/v1/persona-drafts/preview")
async def preview_draft(request: Request, rt: RuntimeDep, user: UserDep) -> dict[str, Any]:
    from persona.editor import preview
    from persona.schema import parse_persona_text

    text = await _text(request)

    def build() -> dict[str, Any]:
        return preview(parse_persona_text(text, file="draft.md", name="draft"), rt.tokenizer)

    return await run_in_threadpool(build)


@router.post("/v1/persona-drafts/card")
async def card_draft(request: Request, user: UserDep, filename: str = Query("card.json")) -> dict[str, Any]:
    from persona.editor import card_text

    raw = await request.body()
    if len(raw) > MAX_CARD_BYTES:
        raise APIError(413, f"the card is {len(raw)} bytes; the limit is {MAX_CARD_BYTES}", param="body")
    return {"text": await run_in_threadpool(card_text, raw, filename)}


@router.get("/v1/personas/{name}/card")
async def export_card(name: str, rt: RuntimeDep, user: UserDep, format: str = Query("json", pattern="^(json|png)$")) -> Response:
    from persona.cards import persona_to_card, write_png_card

    card = persona_to_card(await run_in_threadpool(rt.personas.get, name, user))
    disposition = {"Content-Disposition": f'attachment; filename="{name}.{format}"'}
    if format == "png":
        return Response(write_png_card(card), media_type="image/png", headers=disposition)
    return Response(json.dumps(card, ensure_ascii=False, indent=2), media_type="application/json", headers=disposition)
