"""Probes and metrics: GET /healthz (live), GET /readyz (loaded + warmed up, not draining), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.deps import StateDep
from service.api.schemas import Status

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


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: StateDep) -> Response:
    return Response(content=state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
