"""POST /diagnose and /v1/diagnose: one image in (multipart field `file`, or the raw body), one Verdict out."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from service.api.deps import ApiKeyDep, ReadyStateDep
from service.api.schemas import DiagnoseResponse, ErrorResponse, InputInfo, ModelRef
from service.decode import DecodedImage, check_media_type, decode_image
from service.errors import EmptyBody, MissingFile, PayloadTooLarge
from service.pipeline import DefensePipeline

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
    401: "missing or invalid API key",
    413: "body above max_upload_bytes, or image above max_pixels",
    415: "not PNG/JPEG/DICOM, content type contradicts the bytes, or compressed DICOM without a decoder",
    422: "empty, truncated or undecodable image; multi-frame DICOM; no pixel data",
    503: "not ready, draining, queue full (Retry-After) or request timeout",
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


def _decode_and_prepare(pipeline: DefensePipeline, data: bytes, media_type: str | None, max_pixels: int):
    t0 = time.perf_counter()
    decoded = decode_image(data, media_type, max_pixels)
    decode_seconds = time.perf_counter() - t0
    row, timings = pipeline.preprocess(decoded.image)
    return decoded, row, {"decode": decode_seconds, **timings}


@router.post("/diagnose", response_model=DiagnoseResponse, responses=ERRORS, openapi_extra=OPENAPI_BODY,
             summary="Diagnose one image with the Cushion + Shield defence (alias of /v1/diagnose)")
@router.post("/v1/diagnose", response_model=DiagnoseResponse, responses=ERRORS, openapi_extra=OPENAPI_BODY,
             summary="Diagnose one image with the Cushion + Shield defence")
async def diagnose(request: Request, state: ReadyStateDep, _auth: ApiKeyDep) -> DiagnoseResponse:
    settings, metrics, pipeline = state.settings, state.metrics, state.pipeline
    assert pipeline is not None and state.batcher is not None
    metrics.inflight.inc()
    try:
        started = time.perf_counter()
        with state.batcher.incoming():
            data, media_type = await read_image(request, settings.max_upload_bytes)
            if not data:
                raise EmptyBody("the request carries no image (empty body or empty file)")
            decoded, row, timings = await asyncio.get_running_loop().run_in_executor(
                state.preprocess_pool, _decode_and_prepare, pipeline, data, media_type, settings.max_pixels)
        remaining = settings.request_timeout_seconds - (time.perf_counter() - started)
        result = await state.batcher.submit(row, timeout=remaining)
        timings.update(queue=result.queue_seconds, inference=result.inference_seconds)
        timings["total"] = time.perf_counter() - started
        verdict = pipeline.decide(result.logits, result.shield_logits, timings)
    finally:
        metrics.inflight.dec()
    metrics.diagnoses.labels(diagnosis=verdict.diagnosis, decision=verdict.decision).inc()
    metrics.shield_logit.labels(predicted_class=verdict.diagnosis).observe(verdict.shield_logit)
    metrics.observe_stages(timings)
    state.recorder.record(verdict, request_id=request.state.request_id, image=data, input_format=decoded.format,
                          width=decoded.width, height=decoded.height,
                          key_id=getattr(request.state, "api_key_id", None))
    request.state.log.update(format=decoded.format, width=decoded.width, height=decoded.height,
                             diagnosis=verdict.diagnosis, decision=verdict.decision,
                             shield_logit=round(verdict.shield_logit, 4), batch_size=result.batch_size)
    return _response(request, state, decoded, verdict)


def _response(request: Request, state, decoded: DecodedImage, verdict) -> DiagnoseResponse:
    manifest = state.bundle.manifest
    return DiagnoseResponse(
        request_id=request.state.request_id,
        diagnosis=verdict.diagnosis,
        probabilities=verdict.probabilities,
        decision=verdict.decision,
        shield_logit=verdict.shield_logit,
        threshold=verdict.threshold,
        model=ModelRef(name=manifest.name, version=manifest.version),
        input=InputInfo(format=decoded.format, width=decoded.width, height=decoded.height),
        timings_seconds=verdict.timings,
    )
