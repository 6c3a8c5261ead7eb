"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers carry no keys)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when the model is loaded (or the remote engine answers) and the store answers; 503 with
    the reason otherwise.
    With a Chroma server configured its state is reported too (but does not make us unready)."""
    rt = getattr(request.app.state, "rt", None)
    if rt is None:
        return JSONResponse({"status": "starting", "model": False, "store": False}, status_code=503)
    checks: dict[str, Any] = {"model": rt.model_name, "store": True, "queue_depth": rt.worker.depth}
    engine = await run_in_threadpool(engine_check, rt)
    checks.update(engine)
    if engine.get("engine") is False:  # a remote engine that does not answer: nothing could be generated
        return JSONResponse({"status": "unavailable", **checks}, status_code=503)
    try:
        await run_in_threadpool(rt.store.ping)
    except Exception as exc:  # StoreUnavailable or a driver error: either way not ready
        checks["store"] = False
        checks["store_error"] = str(exc)
        return JSONResponse({"status": "unavailable", **checks}, status_code=503)
    if rt.settings.chroma_url:  # reported, not required: the vector strategy degrades to recent turns
        try:
            await run_in_threadpool(lambda: rt.vector().ping())
            checks["vector"] = True
        except Exception as exc:
            checks["vector"] = False
            checks["vector_error"] = str(exc)
    return JSONResponse({"status": "ready", **checks})


def engine_check(rt: Any) -> dict[str, Any]:
    """What /readyz reports of the backend: nothing for the local model; a remote engine's URL,
    and `engine: false` with the reason when it does not answer."""
    from service.errors import APIError

    try:
        return rt.backend.check_ready()
    except APIError as exc:
        return {"engine": False, "engine_url": rt.settings.engine_url, "engine_error": exc.message}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    rt = getattr(request.app.state, "rt", None)
    body = rt.metrics.render() if rt is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
