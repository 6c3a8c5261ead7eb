"""Personas: list, show, create/replace (persona file text or character card JSON), delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import RuntimeDep, UserDep
from service.errors import APIError

router = APIRouter(prefix="/v1/personas", tags=["personas"])

MAX_PERSONA_BYTES = 512 * 1024


def persona_out(rt: Any, persona: Any) -> dict[str, Any]:
    data = persona.model_dump()
    data["writable"] = rt.personas.is_writable(persona.name)  # extra: can DELETE remove it?
    return data


@router.get("")
async def list_personas(rt: RuntimeDep, user: UserDep) -> dict[str, Any]:
    personas = await run_in_threadpool(rt.personas.list)
    return {"object": "list", "data": [persona_out(rt, p) for p in personas]}


@router.get("/{name}")
async def get_persona(name: str, rt: RuntimeDep, user: UserDep) -> dict[str, Any]:
    return persona_out(rt, await run_in_threadpool(rt.personas.get, name))


@router.put("/{name}")
async def put_persona(name: str, request: Request, rt: RuntimeDep, user: UserDep) -> dict[str, Any]:
    """Body: a persona file (Markdown with YAML front matter) or a character card (JSON)."""
    raw = await request.body()
    if len(raw) > MAX_PERSONA_BYTES:
        raise APIError(413, f"persona body is {len(raw)} bytes; the limit is {MAX_PERSONA_BYTES}", param="body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(422, f"persona body is not UTF-8 text ({exc.reason} at byte {exc.start})", param="body") from exc
    if not text.strip():
        raise APIError(422, "persona body is empty: send persona file text or card JSON", param="body")
    return persona_out(rt, await run_in_threadpool(rt.personas.put, name, text))


@router.put("/{name}/lorebook")
async def put_lorebook(name: str, request: Request, rt: RuntimeDep, user: UserDep) -> dict[str, Any]:
    """Body: world info JSON (SillyTavern's world-info file, a V2 `character_book`, or a whole card):
    it becomes the persona's lorebook (a bundled persona gets a writable copy that carries it)."""
    from persona.lorebook import parse_world_info
    from persona.schema import dump_persona

    raw = await request.body()
    if len(raw) > MAX_PERSONA_BYTES:
        raise APIError(413, f"world info is {len(raw)} bytes; the limit is {MAX_PERSONA_BYTES}", param="body")

    def attach() -> Any:
        persona = rt.personas.get(name)
        book = parse_world_info(raw, source=f"world info for {name}")
        return rt.personas.put(name, dump_persona(persona.model_copy(update={"lorebook": book})))

    return persona_out(rt, await run_in_threadpool(attach))


@router.delete("/{name}", status_code=204)
async def delete_persona(name: str, rt: RuntimeDep, user: UserDep) -> Response:
    from persona.errors import PersonaError, PersonaNotFound
    from persona.schema import check_name

    check_name(name)  # an invalid name is the caller's 422 (below, any PersonaError means read-only)
    try:
        await run_in_threadpool(rt.personas.delete, name)
    except PersonaNotFound:
        raise
    except PersonaError as exc:  # bundled or from MEMENTO_PERSONA_DIR: read-only
        raise APIError(409, str(exc), param="name", code="persona_read_only") from exc
    return Response(status_code=204)
