"""GET /health (no key needed: probes) and GET /metrics (Prometheus' text format)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from .auth import require_api_key

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the engine runs and the server takes requests; 503 once it drains or the engine died."""
    if not request.app.state.engine.alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    if request.app.state.lifecycle.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def prometheus_metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
