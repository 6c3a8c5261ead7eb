"""The FastAPI app: `create_app(settings)`; the lifespan loads the model and opens stores once.

    uvicorn --factory service.main:create_app      # or: memento serve
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from service.errors import install_error_handlers
from service.limits import BodyLimit, HostCheck, PageHeaders, allowed_hosts, json_route_matcher
from service.routers import (
    chat,
    chat_ops,
    completions,
    embeddings,
    health,
    memories,
    persona_editor,
    personas,
    sessions,
    tokenize,
    transfer,
)
from service.runtime import open_runtime
from service.settings import Settings, load_settings

log = logging.getLogger("memento")
STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None, *, lm: Any = None, engine: Any = None, store: Any = None) -> FastAPI:
    """`lm` / `engine` / `store` may be injected (tests: a tiny model); otherwise they come from settings."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await run_in_threadpool(open_runtime, settings, lm=lm, engine=engine, store=store)
        rt.started_at = time.time()
        rt.schedule_tombstones()  # deletions a previous run could not finish in Chroma
        app.state.rt = rt
        if rt.lm is not None:
            log.info("model %s ready (context window %d) on %s", rt.model_name, rt.context_window, rt.lm.device)
        else:  # the engine may still be starting: /readyz says when it answers
            log.info("remote engine %s (model %s)", rt.settings.engine_url, rt.model_name)
        try:
            yield
        finally:
            app.state.rt = None
            await run_in_threadpool(rt.close)

    app = FastAPI(title="Memento", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.key_owners = settings.key_owners
    app.state.admins = settings.admins
    app.state.rt = None
    install_error_handlers(app)
    modules = (health, chat, completions, embeddings, tokenize, sessions, chat_ops, persona_editor, personas, memories,
               transfer)
    for module in modules:
        app.include_router(module.router)
    app.middleware("http")(count_requests)
    # refusals before parsing (service/limits.py); the last added runs first
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes, json_route=json_route_matcher(app))
    app.add_middleware(HostCheck, allowed=allowed_hosts(settings.allowed_hosts))
    app.add_middleware(PageHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


async def count_requests(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    rt = getattr(request.app.state, "rt", None)
    route = request.scope.get("route")
    if rt is not None and route is not None:  # unknown paths are not counted (no label explosion)
        rt.metrics.requests.labels(request.method, getattr(route, "path", "?"), str(response.status_code)).inc()
        if response.status_code == 429:
            rt.metrics.rejected.inc()
    return response
