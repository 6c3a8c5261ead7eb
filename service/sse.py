"""Server-sent events framing shared by the native and the OpenAI-compatible streams."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import StreamingResponse

KEEPALIVE = b": keep-alive\n\n"  # a comment line: clients ignore it, proxies see traffic
DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream


def event(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def response(body: Any, headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})
