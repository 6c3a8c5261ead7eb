"""One error shape for every failure: `{"error": {"message", "type", "param", "code"}}`.

Code below the routes raises `APIError` (or a domain exception mapped here); the handlers
installed by `install_error_handlers` turn them into responses at the edge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("memento.errors")

# HTTP status -> OpenAI-style error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(what: str, name: str, param: str | None = None) -> APIError:
    return APIError(404, f"{what} {name!r} not found", param=param, code=f"{what}_not_found")


def store_unavailable(exc: Exception) -> APIError:
    return APIError(
        503,
        f"the transcript store is unreachable ({exc}); retry shortly",
        code="store_unavailable",
        headers={"Retry-After": "2"},
    )


def _field_path(loc: Sequence[Any]) -> str:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    from memory.config import STRATEGY_NAMES

    # a memory config's union tag ("memory", "window", "turns") is not a field: say "memory.turns"
    parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "memory" and p in STRATEGY_NAMES)]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def as_api_error(exc: Exception) -> APIError | None:
    """Domain exceptions from the other packages -> APIError; None when unknown."""
    from memory.context import ContextOverflow
    from memory.store import MessageNotFound, SessionExists, SessionNotFound, StoreError, StoreUnavailable
    from model.chat_template import ChatTemplateError
    from service.worker import JobCancelled, QueueFull

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ContextOverflow):
        return APIError(400, str(exc), param="content", code="context_length_exceeded")
    if isinstance(exc, JobCancelled):
        return APIError(504, "timed out waiting for the model (request_timeout)", code="timeout")
    if isinstance(exc, StoreUnavailable):
        return store_unavailable(exc)
    if isinstance(exc, SessionNotFound):
        return not_found("session", exc.session_id)
    if isinstance(exc, MessageNotFound):
        return not_found("message", exc.message_id, param="message_id")
    if isinstance(exc, SessionExists):
        return APIError(409, str(exc), param="session_id", code="session_exists")
    if isinstance(exc, StoreError):  # any other store failure: the client's input was not at fault
        return APIError(503, f"the transcript store failed ({exc}); retry shortly", code="store_error",
                        headers={"Retry-After": "2"})
    if isinstance(exc, ChatTemplateError):  # e.g. Gemma's template needs user/assistant alternating
        return APIError(422, f"the model's chat template refused these messages: {exc}", param="messages",
                        code="invalid_messages")
    from persona.errors import PersonaError, PersonaNotFound, PersonaReadOnly

    if isinstance(exc, PersonaNotFound):
        return APIError(404, str(exc), param="persona", code="persona_not_found")
    if isinstance(exc, PersonaReadOnly):
        return APIError(409, str(exc), param="name", code="persona_read_only")
    if isinstance(exc, PersonaError):
        return APIError(422, str(exc), param=exc.field or "persona", code="invalid_persona")
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        path = _field_path(first.get("loc", ()))
        msg = f"{path}: {first.get('msg', 'invalid value')}"
        more = len(exc.errors()) - 1
        if more > 0:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        return JSONResponse(error_body(422, msg, param=path, code="invalid_value"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(
            error_body(exc.status_code, message), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        api = as_api_error(exc)
        if api is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            api = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
        return JSONResponse(api.body(), status_code=api.status, headers=api.headers)

    # Specific classes go through Starlette's ExceptionMiddleware (answered, not re-raised);
    # the bare Exception handler is the last resort for bugs (500, logged with traceback).
    for cls in _domain_exceptions():
        app.add_exception_handler(cls, _domain)
    app.add_exception_handler(Exception, _domain)


def _domain_exceptions() -> list[type[Exception]]:
    from memory.context import ContextOverflow
    from memory.store import StoreError
    from model.chat_template import ChatTemplateError
    from persona.errors import PersonaError
    from service.worker import JobCancelled, QueueFull

    return [APIError, StoreError, QueueFull, JobCancelled, ContextOverflow, PersonaError, ChatTemplateError]
