"""`Annotated` dependency aliases so that route signatures read as plain typed parameters.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread, a hop per request that
these non-blocking checks do not need.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.security import require_api_key, require_full_scope
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.aegis


async def get_ready_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.aegis
    if not state.ready or state.pipeline is None or state.batcher is None:
        raise NotReady("the model is not loaded and warmed up yet")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
ReadyStateDep = Annotated[ServiceState, Depends(get_ready_state)]
ApiKeyDep = Annotated[None, Depends(require_api_key)]
FullScopeDep = Annotated[None, Depends(require_full_scope)]
