"""Refusals that happen before any route parses a body: size, content type, Host, page headers.

    BodyLimit        pure ASGI: 413 for a body over `max_body_bytes`, before it is read. A declared
                     Content-Length is refused at once; a chunked body is counted as it arrives and
                     refused the moment it passes the limit, so memory never holds more than the limit.
                     On routes that take a JSON model it also answers 415 to any other content type
                     (a cross-site `fetch` can send text/plain or no type without a CORS preflight).
    HostCheck        400 unless the Host header is a loopback name or in MEMENTO_ALLOWED_HOSTS
                     (TrustedHostMiddleware's rule; a DNS-rebinding page reaches a loopback server
                     under its own Host name).
    PAGE_HEADERS     CSP, X-Frame-Options and Referrer-Policy added to every response.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import APIError, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
JSON_TYPES = ("application/json",)
BODY_METHODS = ("POST", "PUT", "PATCH")

# The page loads only its own scripts and styles; app.js sets element.style (allowed by
# style-src-attr), and fetches only this origin. Nothing may frame it.
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(
            413,
            f"request body is over the {limit}-byte limit (max_body_bytes); send a smaller body "
            "or raise MEMENTO_MAX_BODY_BYTES",
            param="body",
            code="body_too_large",
        )


def allowed_hosts(extra: list[str]) -> list[str]:
    """Loopback names always; `extra` adds names (`*` accepts any Host, `*.example.com` a domain)."""
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *extra]))


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


class BodyLimit:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer the body it is meant to refuse)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, json_route: Callable[[Scope], bool] | None = None):
        self.app = app
        self.limit = max_body_bytes
        self.json_route = json_route or (lambda scope: False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.strip().isdigit() and int(declared) > self.limit:
            await answer(send, BodyTooLarge(self.limit), close=True)
            return
        if self.json_route(scope) and not is_json_type(headers.get("content-type", "")):
            got = headers.get("content-type") or "none"
            await answer(send, APIError(
                415, f"Content-Type {got!r} is not JSON; send the body as JSON with 'Content-Type: application/json'",
                param="Content-Type", code="unsupported_media_type"))
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Past the limit the app is told the client left (http.disconnect), whatever it then answers
        is dropped, and the 413 goes out instead. Raising from `receive` would not do: FastAPI turns
        any error while reading a body into a 400."""
        seen = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await answer(send, BodyTooLarge(self.limit), close=True)


async def answer(send: Send, exc: APIError, close: bool = False) -> None:
    body = json.dumps(error_body(exc.status, exc.message, param=exc.param, code=exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread body is still on the wire; the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """Starlette's TrustedHostMiddleware rule (exact names, `*.domain`, `*`), answered in our error shape."""

    def __init__(self, app: ASGIApp, allowed: list[str]):
        self.app = app
        self.allowed = allowed

    def accepts(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # strip a port, keep "[::1]"
        name = name.lower()
        return any(p == "*" or p.lower() == name or (p.startswith("*.") and name.endswith(p[1:].lower()))
                   for p in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
        if self.accepts(host):
            await self.app(scope, receive, send)
            return
        await answer(send, APIError(
            400, f"Host {host!r} is not served here; add it to MEMENTO_ALLOWED_HOSTS (comma-separated) to accept it",
            param="Host", code="invalid_host"))


class PageHeaders:
    """Adds PAGE_HEADERS to every HTTP response (API answers carry them harmlessly)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in PAGE_HEADERS.items() if k.encode() not in present]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, with_headers)


def json_route_matcher(app: Any) -> Callable[[Scope], bool]:
    """True for a request whose operation takes a JSON body model, read from the app's own OpenAPI
    document (a public view of every route, however routers are nested).

    Routes that read raw bodies (persona files, card JSON or PNG, JSONL imports) declare no JSON
    request body and keep accepting their own types. Built on first use: routers are included
    after the middleware is added."""
    from starlette.routing import compile_path

    table: list[tuple[Any, set[str]]] = []

    def build() -> None:
        for path, ops in app.openapi().get("paths", {}).items():
            methods = {m.upper() for m, op in ops.items()
                       if isinstance(op, dict) and list(op.get("requestBody", {}).get("content", {})) == ["application/json"]}
            if methods:
                table.append((compile_path(path)[0], methods))

    def matches(scope: Scope) -> bool:
        if not table:
            build()
        path = scope.get("path", "")
        return any(scope["method"] in methods and regex.match(path) for regex, methods in table)

    return matches
