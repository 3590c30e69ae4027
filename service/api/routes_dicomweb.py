"""DICOMweb STOW-RS (DICOM PS3.18 §10.5): `POST /v1/studies` with `multipart/related; type="application/dicom"`,
one DICOM Part 10 instance per part. Every instance goes through the same diagnose use case as /v1/diagnose (and so
into the decision record, with the request's id and `source="stow-rs"`); the instances of one request are
diagnosed concurrently, so the micro-batcher can put them in one model call.

The answer is the Store Instances Response Module as `application/dicom+json`:
- ReferencedSOPSequence: one item per diagnosed instance (its SOP Class and Instance UIDs) carrying the answer of
  /v1/diagnose in the private block "MEDICAL AEGIS" of group 0009 (`PRIVATE` below);
- FailedSOPSequence: one item per refused instance with its Failure Reason (`service.errors`' DICOM status) and,
  in the private block, the part number, the service's reason code and a readable detail.
HTTP status: 200 every instance diagnosed, 202 some refused, 409 all refused, 503 (+ Retry-After) all refused for lack
of resources; 400 a body that is not a multipart message, 415 a request that is not `application/dicom` parts.
A Shield rejection is a diagnosed instance (decision "reject"), not a failure. Nothing is stored: the service
keeps only its decision record, so no RetrieveURL is given.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.api.deps import ApiKeyDep, ReadyStateDep
from service.api.routes_diagnose import ERRORS
from service.dicom_store import InstanceOutcome, diagnose_instance
from service.errors import MalformedMultipart, PayloadTooLarge, UnsupportedMediaType
from service.state import ServiceState

router = APIRouter(tags=["DICOMweb"])
DICOM_JSON = "application/dicom+json"


class DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON  # exactly, without parameters: dicomweb-client compares the whole header
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0009, "MEDICAL AEGIS"
# element offsets in the private block: (keyword for the docs, VR)
PRIVATE = {
    "part": (0x01, "US"),  # 1-based position of the instance in the multipart body
    "diagnosis": (0x10, "LO"),
    "decision": (0x11, "LO"),  # accept | reject
    "shield_logit": (0x12, "FD"),
    "threshold": (0x13, "FD"),
    "probabilities": (0x14, "UT"),  # JSON object: class name -> probability
    "model_name": (0x15, "LO"),
    "model_version": (0x16, "LO"),
    "reason": (0x20, "LO"),  # the service's reason code, as in /v1/diagnose's error answers
    "detail": (0x21, "LT"),
}
OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": "DICOM Part 10 instances, one per part of a multipart/related body "
                       "(type=\"application/dicom\"), as a DICOMweb STOW-RS client sends them.",
        "content": {'multipart/related; type="application/dicom"': {"schema": {"type": "string",
                                                                             "format": "binary"}}},
    }
}
RESPONSES = {
    # the service's own errors (before any instance is read) are its JSON ErrorResponse, not DICOM JSON
    **{code: {**answer, "content": {"application/json": {}}} for code, answer in ERRORS.items()
       if code in (401, 413, 429, 503)},
    200: {"description": "every instance diagnosed", "content": {DICOM_JSON: {}}},
    202: {"description": "some instances diagnosed, others refused (FailedSOPSequence)", "content": {DICOM_JSON: {}}},
    400: {"description": "not a readable multipart/related body"},
    409: {"description": "every instance refused (FailedSOPSequence says why)", "content": {DICOM_JSON: {}}},
    415: {"description": "not multipart/related with application/dicom parts"},
}


@router.post("/v1/studies", responses=RESPONSES, openapi_extra=OPENAPI_BODY, response_class=DicomJSONResponse,
             summary="DICOMweb STOW-RS: diagnose every DICOM instance of a multipart/related request")
async def store_instances(request: Request, state: ReadyStateDep, _auth: ApiKeyDep) -> DicomJSONResponse:
    boundary = _boundary(request.headers.get("content-type", ""))
    parts = await _read_parts(request, boundary, state.settings.dicomweb_max_instances)
    request_id = request.state.request_id
    key_id = getattr(request.state, "api_key_id", None)
    outcomes = await asyncio.gather(*(
        _store_part(state, part_type, data, request_id=request_id, key_id=key_id, part=number)
        for number, (part_type, data) in enumerate(parts, start=1)))
    diagnosed = sum(o.ok for o in outcomes)
    request.state.log.update(instances=len(outcomes), diagnosed=diagnosed, refused=len(outcomes) - diagnosed)
    headers = {}
    if diagnosed == len(outcomes):
        status = 200
    elif diagnosed:
        status = 202
    elif all(o.retriable for o in outcomes):
        status, headers = 503, {"Retry-After": str(state.settings.retry_after_seconds)}
    else:
        status = 409
    return DicomJSONResponse(_response_dataset(state, outcomes).to_json_dict(), status_code=status,
                             headers=headers)


def _boundary(content_type: str) -> bytes:
    media, params = parse_options_header(content_type)
    if media.lower() != b"multipart/related":
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related; type=\"application/dicom\", not "
                                   f"{media.decode('latin-1')!r}")
    part_type = params.get(b"type", b"application/dicom").lower()
    if part_type != b"application/dicom":
        raise UnsupportedMediaType(f"multipart/related of type {part_type.decode('latin-1')!r} is not accepted: "
                                   "send DICOM Part 10 instances (type=\"application/dicom\")")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedMultipart("the multipart/related content type has no boundary")
    return boundary


async def _read_parts(request: Request, boundary: bytes, max_parts: int) -> list[tuple[str | None, bytes]]:
    """(declared content type, bytes) of each part, streamed through python-multipart's parser."""
    parts: list[tuple[str | None, bytes]] = []
    headers: dict[str, str] = {}
    field, value, data, ended = bytearray(), bytearray(), bytearray(), []

    def header_end() -> None:
        headers[field.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        field.clear(), value.clear()

    def part_end() -> None:
        if len(parts) >= max_parts:
            raise PayloadTooLarge(f"more than {max_parts} instances in one request (AEGIS_DICOMWEB_MAX_INSTANCES)")
        parts.append((headers.get("content-type"), bytes(data)))
        headers.clear(), data.clear()

    parser = MultipartParser(boundary, callbacks={
        "on_header_field": lambda b, start, end: field.extend(b[start:end]),
        "on_header_value": lambda b, start, end: value.extend(b[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda b, start, end: data.extend(b[start:end]),
        "on_part_end": part_end,
        "on_end": lambda: ended.append(True),
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise MalformedMultipart(f"unreadable multipart/related body: {error}") from None
    if not ended:
        raise MalformedMultipart("the multipart/related body ends before its closing boundary")
    if not parts:
        raise MalformedMultipart("the multipart/related body holds no instance")
    return parts


async def _store_part(state: ServiceState, part_type: str | None, data: bytes, *, part: int, **ids
                      ) -> InstanceOutcome:
    media = (part_type or "application/dicom").split(";")[0].strip().lower()
    if media != "application/dicom":
        state.metrics.request_errors.labels(reason=UnsupportedMediaType.reason).inc()
        return InstanceOutcome(None, None, reason=UnsupportedMediaType.reason, status=UnsupportedMediaType.dicom_status,
                               detail=f"part {part} is {media!r}, not application/dicom")
    return await diagnose_instance(state, data, source="stow-rs", part=part, **ids)


def _response_dataset(state: ServiceState, outcomes: list[InstanceOutcome]) -> Dataset:
    manifest = state.bundle.manifest
    referenced, failed = [], []
    for number, outcome in enumerate(outcomes, start=1):
        item = Dataset()
        if outcome.sop_class_uid:
            item.ReferencedSOPClassUID = outcome.sop_class_uid
        if outcome.sop_instance_uid:
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        facts: dict = {"part": number}
        if outcome.ok:
            verdict = outcome.result.verdict
            facts.update(diagnosis=verdict.diagnosis, decision=verdict.decision,
                         shield_logit=float(verdict.shield_logit), threshold=float(verdict.threshold),
                         probabilities=json.dumps(verdict.probabilities), model_name=manifest.name,
                         model_version=manifest.version)
            referenced.append(item)
        else:
            item.FailureReason = outcome.status
            facts.update(reason=outcome.reason, detail=outcome.detail)
            failed.append(item)
        block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        for name, fact in facts.items():
            offset, vr = PRIVATE[name]
            block.add_new(offset, vr, fact)
    answer = Dataset()
    if referenced:
        answer.ReferencedSOPSequence = referenced
    if failed:
        answer.FailedSOPSequence = failed
    return answer
