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
    """Ready when the model is loaded and the store answers; 503 with the reason otherwise.
    With a Chroma server configured its state is reported too (but does not make us unready)."""
    rt = getattr(request.app.state, "rt", None)
    if rt is None:
        return JSONResponse({"status": "starting", "model": False, "store": False}, status_code=503)
    checks: dict[str, Any] = {"model": rt.lm.name, "store": True, "queue_depth": rt.worker.depth}
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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    rt = getattr(request.app.state, "rt", None)
    body = rt.metrics.render() if rt is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
