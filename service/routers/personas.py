"""Personas: list, show, create/replace (persona file text or character card JSON), delete.

Each caller sees their own personas and the shared ones; writes follow persona/registry.py
(a user's PUT of a shared name is 409; admins manage the shared ones, `?shared=true` creates one).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import AdminDep, RuntimeDep, UserDep
from service.errors import APIError

router = APIRouter(prefix="/v1/personas", tags=["personas"])

MAX_PERSONA_BYTES = 512 * 1024


def persona_out(rt: Any, persona: Any, user: str, admin: bool) -> dict[str, Any]:
    data = persona.model_dump()
    origin = rt.personas.origin(persona.name, user)
    data["shared"] = origin != "own"  # extra: everyone sees it (bundled, a persona directory, an admin's)
    data["writable"] = rt.personas.is_writable(persona.name, user, admin)  # extra: may this caller PUT/DELETE it?
    return data


@router.get("")
async def list_personas(rt: RuntimeDep, user: UserDep, admin: AdminDep) -> dict[str, Any]:
    def listed() -> list[dict[str, Any]]:
        return [persona_out(rt, p, user, admin) for p in rt.personas.list(user)]

    return {"object": "list", "data": await run_in_threadpool(listed)}


@router.get("/{name}")
async def get_persona(name: str, rt: RuntimeDep, user: UserDep, admin: AdminDep) -> dict[str, Any]:
    return await run_in_threadpool(lambda: persona_out(rt, rt.personas.get(name, user), user, admin))


async def _body_text(request: Request) -> str:
    raw = await request.body()
    if len(raw) > MAX_PERSONA_BYTES:
        raise APIError(413, f"persona body is {len(raw)} bytes; the limit is {MAX_PERSONA_BYTES}", param="body")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(422, f"persona body is not UTF-8 text ({exc.reason} at byte {exc.start})", param="body") from exc


@router.put("/{name}")
async def put_persona(
    name: str, request: Request, rt: RuntimeDep, user: UserDep, admin: AdminDep, shared: bool = Query(False)
) -> dict[str, Any]:
    """Body: a persona file (Markdown with YAML front matter) or a character card (JSON).
    `shared=true` (admins only) makes a new name a shared persona instead of the caller's own."""
    text = await _body_text(request)
    if not text.strip():
        raise APIError(422, "persona body is empty: send persona file text or card JSON", param="body")
    if shared and not admin:
        raise APIError(403, "only an admin key (KEY:USER:admin in MEMENTO_API_KEYS) may create shared personas",
                       param="shared", code="not_admin")

    def put() -> dict[str, Any]:
        return persona_out(rt, rt.personas.put(name, text, user, admin=admin, shared=shared), user, admin)

    return await run_in_threadpool(put)


@router.put("/{name}/lorebook")
async def put_lorebook(name: str, request: Request, rt: RuntimeDep, user: UserDep, admin: AdminDep) -> dict[str, Any]:
    """Body: world info JSON (SillyTavern's world-info file, a V2 `character_book`, or a whole card):
    it becomes the persona's lorebook (the caller's own persona; a shared one only for admins)."""
    from persona.lorebook import parse_world_info
    from persona.schema import dump_persona

    raw = await request.body()
    if len(raw) > MAX_PERSONA_BYTES:
        raise APIError(413, f"world info is {len(raw)} bytes; the limit is {MAX_PERSONA_BYTES}", param="body")

    def attach() -> Any:
        persona = rt.personas.get(name, user)
        book = parse_world_info(raw, source=f"world info for {name}")
        updated = rt.personas.put(name, dump_persona(persona.model_copy(update={"lorebook": book})), user, admin=admin)
        return persona_out(rt, updated, user, admin)

    return await run_in_threadpool(attach)


@router.delete("/{name}", status_code=204)
async def delete_persona(name: str, rt: RuntimeDep, user: UserDep, admin: AdminDep) -> Response:
    # 404: unknown or another user's; 409 persona_read_only: shared (service/errors.py)
    await run_in_threadpool(rt.personas.delete, name, user, admin)
    return Response(status_code=204)
