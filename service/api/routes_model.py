"""GET /v1/model: the manifest, the model card and the security report of the served bundle."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import FullScopeDep, ReadyStateDep
from service.api.schemas import ErrorResponse, ModelResponse

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelResponse,
            responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
            summary="The served bundle: manifest, model card, security report (null when the bundle has none)")
async def model(state: ReadyStateDep, _auth: FullScopeDep) -> ModelResponse:
    bundle = state.bundle
    return ModelResponse(
        bundle_digest=bundle.digest,
        bundle_signature=bundle.signature,
        manifest=bundle.manifest.model_dump(mode="json"),
        model_card=bundle.model_card(),
        security_report=bundle.report("security_report"),
        provider=state.provider,
    )
