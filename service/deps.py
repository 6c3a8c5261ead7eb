"""FastAPI dependencies: the runtime, the calling user (API-key auth), the conversation service.

    UserDep     the owner of whatever the request touches ("local" when auth is off)
    AdminDep    whether that user's key ends in `:admin` (manages shared personas; always, when auth is off)
    RuntimeDep  app.state.rt (model, store, personas, worker, metrics)
    ConvDep     service.conversation.Conversations bound to the runtime
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.conversation import Conversations
from service.errors import APIError
from service.runtime import Runtime
from service.settings import LOCAL_USER


def get_runtime(request: Request) -> Runtime:
    rt = getattr(request.app.state, "rt", None)
    if rt is None:
        raise APIError(503, "the service is still starting (model loading); retry shortly", code="not_ready")
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def authenticate(owners: dict[str, str], authorization: str | None) -> str | None:
    """The user owning the bearer key in `authorization`, else None. Every configured key is
    compared in constant time (hmac.compare_digest) so timing does not leak which one nearly matched."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    given = key.strip().encode()
    found = None
    for candidate, user in owners.items():
        if hmac.compare_digest(candidate.encode(), given):
            found = user
    return found


def get_user(request: Request) -> str:
    owners: dict[str, str] = request.app.state.key_owners  # parsed once in create_app
    if not owners:
        return LOCAL_USER
    user = authenticate(owners, request.headers.get("authorization"))
    if user is None:
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer KEY' with a key from MEMENTO_API_KEYS",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


UserDep = Annotated[str, Depends(get_user)]


def get_admin(request: Request, user: UserDep) -> bool:
    # without keys the one local user is the operator, who owns the shared personas too
    return not request.app.state.key_owners or user in request.app.state.admins


AdminDep = Annotated[bool, Depends(get_admin)]


def get_conversations(rt: RuntimeDep) -> Conversations:
    return Conversations(rt)


ConvDep = Annotated[Conversations, Depends(get_conversations)]
