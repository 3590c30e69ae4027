"""POST /diagnose and /v1/diagnose: one image in (multipart field `file`, or the raw body), one Verdict out."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile

from service import diagnosis, review
from service.api.deps import ApiKeyDep, ReadyStateDep
from service.api.schemas import DiagnoseResponse, ErrorResponse, InputInfo, ModelRef, ReviewImages
from service.decode import DecodedImage, check_media_type
from service.errors import MissingFile, PayloadTooLarge
from service.pipeline import Verdict
from service.security import request_scope
from service.state import ServiceState

router = APIRouter(tags=["diagnose"])

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": "A PNG, JPEG or DICOM (Part 10) image: multipart/form-data field `file`, or the raw body "
                       "with its content type.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": _IMAGE_SCHEMA}}},
            "image/png": {"schema": _IMAGE_SCHEMA},
            "image/jpeg": {"schema": _IMAGE_SCHEMA},
            "application/dicom": {"schema": _IMAGE_SCHEMA},
            "application/octet-stream": {"schema": _IMAGE_SCHEMA},
        },
    }
}
ERRORS = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "malformed multipart body (no boundary, more than 8 fields or more than 1 file)",
    401: "missing or invalid API key",
    413: "body above max_upload_bytes, or image above max_pixels / max_dicom_pixels",
    415: "not PNG/JPEG/DICOM, content type contradicts the bytes, or compressed DICOM without a decoder",
    422: "empty, truncated or undecodable image; multi-frame DICOM; no pixel data",
    429: "too many failed authentications from this address (Retry-After)",
    503: "not ready, draining, a stage full (Retry-After) or request timeout",
}.items()}


async def read_image(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """The image bytes and their declared media type, from a multipart upload or the raw body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes")
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise MissingFile("the multipart body has no file field named 'file'")
            return await upload.read(), upload.content_type
        finally:
            await form.close()
    check_media_type(content_type)  # 415 before reading a body that cannot be an image
    return await request.body(), content_type


@router.post("/diagnose", response_model=DiagnoseResponse, responses=ERRORS, openapi_extra=OPENAPI_BODY,
             response_model_exclude_none=True,
             summary="Diagnose one image with the Cushion + Shield defence (alias of /v1/diagnose)")
@router.post("/v1/diagnose", response_model=DiagnoseResponse, responses=ERRORS, openapi_extra=OPENAPI_BODY,
             response_model_exclude_none=True, summary="Diagnose one image with the Cushion + Shield defence")
async def diagnose(request: Request, state: ReadyStateDep, _auth: ApiKeyDep,
                   images: Annotated[bool, Query(description="also return the uploaded image as decoded and the "
                                                         "Cushioned model input, as PNG data URLs")] = False,
                   ) -> Response:
    result = await diagnosis.diagnose(state, lambda: read_image(request, state.settings.max_upload_bytes),
                                      request_id=request.state.request_id,
                                      key_id=getattr(request.state, "api_key_id", None),
                                      started=getattr(request.state, "started", None))
    verdict, decoded = result.verdict, result.decoded
    request.state.log.update(format=decoded.format, width=decoded.width, height=decoded.height,
                             diagnosis=verdict.diagnosis, decision=verdict.decision,
                             shield_logit=round(verdict.shield_logit, 4), batch_size=result.batch_size)
    response = _response(request, state, decoded, verdict)
    if images:  # PNG encoding off the event loop, in the pool that decodes
        pictures = await asyncio.get_running_loop().run_in_executor(
            state.preprocess_pool, review.previews, decoded, result.model_input)
        response.images = ReviewImages(**pictures)
    # serialised once by pydantic-core: FastAPI would validate the model it was handed again and dump it through
    # json.dumps (~35 us more per request); `response_model` above still documents it
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


def _response(request: Request, state: ServiceState, decoded: DecodedImage, verdict: Verdict) -> DiagnoseResponse:
    manifest = state.bundle.manifest
    answer = DiagnoseResponse(
        request_id=request.state.request_id,
        diagnosis=verdict.diagnosis,
        decision=verdict.decision,
        model=ModelRef(name=manifest.name, version=manifest.version),
        input=InputInfo(format=decoded.format, width=decoded.width, height=decoded.height),
    )
    if request_scope(request) == "full":  # the scores: for trusted callers only (docs/security.md)
        answer = answer.model_copy(update=dict(probabilities=verdict.probabilities, shield_logit=verdict.shield_logit,
                                               threshold=verdict.threshold, timings_seconds=verdict.timings))
    return answer
