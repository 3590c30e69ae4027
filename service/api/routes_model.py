"""GET /v1/model: the manifest, the model card and the security report of the served bundle; the two documents also
on their own, as Markdown or as an HTML fragment (the review page's dialog)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from service.api.deps import FullScopeDep, ReadyStateDep
from service.api.schemas import THROTTLED, ErrorResponse, ModelResponse
from service.errors import DocumentMissing
from service.review import markdown_to_html

router = APIRouter(tags=["model"], responses=THROTTLED)
DOCUMENT_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 422, 503)}  # 403: coarse keys
MARKDOWN = "text/markdown; charset=utf-8"


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


def _document(text: str, format: Literal["markdown", "html"]) -> Response:
    if format == "html":
        return HTMLResponse(markdown_to_html(text))
    return Response(text, media_type=MARKDOWN)


@router.get("/v1/model/card", response_class=Response, responses=DOCUMENT_ERRORS,
            summary="The bundle's model card (MODEL_CARD.md), as Markdown or an HTML fragment")
async def model_card(state: ReadyStateDep, _auth: FullScopeDep,
                     format: Literal["markdown", "html"] = "markdown") -> Response:
    return _document(state.bundle.model_card(), format)


@router.get("/v1/model/security-report", response_class=Response, responses=DOCUMENT_ERRORS,
            summary="The bundle's security report (security_report.md), as Markdown or an HTML fragment")
async def security_report(state: ReadyStateDep, _auth: FullScopeDep,
                          format: Literal["markdown", "html"] = "markdown") -> Response:
    text = state.bundle.report("security_report_md")
    if text is None:
        raise DocumentMissing("this model bundle carries no security report (python -m training.audit report)")
    return _document(text, format)
