"""GET /v1/decisions: the decision record, filtered by time, decision and class, paginated by record id.

Rows reach the database within AEGIS_RECORD_FLUSH_SECONDS of their answer (the writer batches them), so the last
fraction of a second of decisions may not be listed yet.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from service.api.deps import FullScopeDep, StateDep
from service.api.schemas import THROTTLED, DecisionsPage, ErrorResponse
from service.errors import NotReady, RecordDisabled
from service.record.store import DecisionFilter, query_decisions

router = APIRouter(tags=["decision record"], responses=THROTTLED)


@router.get("/v1/decisions", response_model=DecisionsPage,
            responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                       422: {"model": ErrorResponse, "description": "invalid query"}, 503: {"model": ErrorResponse}},
            summary="The decision record: every decision, oldest first, without patient data")
async def decisions(
    state: StateDep, _auth: FullScopeDep,
    since: Annotated[datetime | None, Query(description="decided at or after (ISO 8601; no offset = UTC)")] = None,
    until: Annotated[datetime | None, Query(description="decided before (ISO 8601; no offset = UTC)")] = None,
    decision: Literal["accept", "reject"] | None = None,
    diagnosis: Annotated[str | None, Query(max_length=64, description="predicted class name")] = None,
    request_id: Annotated[str | None, Query(max_length=128)] = None,
    after_id: Annotated[int, Query(ge=0, description="the next_after_id of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DecisionsPage:
    recorder = state.recorder
    if recorder is None:
        raise NotReady("the decision record is not open yet")
    if not recorder.enabled:
        raise RecordDisabled("the decision record is disabled on this service (AEGIS_RECORD_ENABLED=false)")
    where = DecisionFilter(since=since, until=until, decision=decision, diagnosis=diagnosis, request_id=request_id)
    rows = await asyncio.to_thread(query_decisions, recorder.engine, where, after_id=after_id, limit=limit)
    return DecisionsPage(decisions=rows, next_after_id=rows[-1]["id"] if len(rows) == limit else None)
