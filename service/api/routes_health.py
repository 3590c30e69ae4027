"""Probes and metrics: GET /healthz (live), GET /readyz (loaded + warmed up, not draining), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import StateDep
from service.api.schemas import ErrorResponse, Status
from service.errors import ServiceError
from service.security import require_full_scope

router = APIRouter(tags=["operations"])


def readiness(state) -> str:
    return state.readiness()


@router.get("/healthz", response_model=Status, summary="Liveness: the process answers")
async def healthz() -> Status:
    return Status(status="alive")


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}},
            summary="Readiness: bundle loaded, one warm-up inference done, not draining")
async def readyz(state: StateDep):
    status = readiness(state)
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


class MetricsElsewhere(ServiceError):
    status, reason = 404, "not_found"


async def metrics_access(request: Request) -> None:
    """AEGIS_METRICS_PORT set: /metrics lives on that port only; AEGIS_METRICS_ACCESS=key: an API key is needed."""
    settings = request.app.state.aegis.settings
    if settings.metrics_port:
        raise MetricsElsewhere("metrics are served on a separate port (AEGIS_METRICS_PORT)")
    if settings.metrics_access == "key":
        await require_full_scope(request)


@router.get("/metrics", summary="Prometheus metrics (text exposition format; API key unless AEGIS_METRICS_ACCESS=open)",
            response_class=Response, dependencies=[Depends(metrics_access)],
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"model": ErrorResponse},
                       403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
async def metrics(state: StateDep) -> Response:
    return Response(content=state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
