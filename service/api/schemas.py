"""Pydantic response schemas (they are the OpenAPI documentation of the answers)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str
    version: str


class InputInfo(BaseModel):
    format: Literal["png", "jpeg", "dicom"]
    width: int
    height: int


class ReviewImages(BaseModel):
    uploaded: str = Field(description="the upload as the service decoded it (DICOM after its VOI window, upright), "
                                      "at most 512 px on its long side: a PNG data URL")
    model_input: str = Field(description="what the model saw: the image resized and Cushioned, at the model's "
                                         "resolution: a PNG data URL")


class DiagnoseResponse(BaseModel):
    """The answer. Callers with the `coarse` scope get request_id, diagnosis, decision, model and input only: the
    scores are what a black-box attacker optimises against (docs/security.md, "What the answer reveals")."""

    request_id: str
    diagnosis: str = Field(description="the predicted class name")
    probabilities: dict[str, float] | None = Field(
        None, description="softmax of the classifier logits, per class name (full scope only)")
    decision: Literal["accept", "reject"] = Field(
        description="accept: the Shield of the predicted class judges the image clean; reject: likely adversarial "
                    "or out of distribution, do not use the diagnosis")
    shield_logit: float | None = Field(
        None, description="the predicted class's Shield logit (high = clean; full scope only)")
    threshold: float | None = Field(None, description="accept iff shield_logit >= threshold (full scope only)")
    model: ModelRef
    input: InputInfo
    timings_seconds: dict[str, float] | None = Field(
        None, description="decode, prepare, cushion, queue, inference (the batch's ONNX Runtime call), total "
                          "(full scope only)")
    images: ReviewImages | None = Field(None, description="only with ?images=true (the review page)")


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, for a human")
    reason: str = Field(description="a stable machine-readable code, e.g. payload_too_large")
    request_id: str | None = None


# Every route that checks an API key may answer 429: too many failed authentications from the caller's address
# (service/security.py); the routers of such routes carry this in their documented responses.
THROTTLED = {429: {"model": ErrorResponse, "description": "too many failed authentications from this address "
                                                           "(Retry-After)"}}


class ModelResponse(BaseModel):
    bundle_digest: str = Field(description="sha256 of the canonical manifest, which holds the sha256 of every other "
                                           "bundle file (models/bundle.py, bundle_digest)")
    bundle_signature: Literal["verified", "unsigned"] = Field(
        description="verified: the bundle's Ed25519 signature matched AEGIS_BUNDLE_PUBLIC_KEY_FILE at start-up")
    manifest: dict[str, Any]
    model_card: str
    security_report: Any | None = None
    provider: str = Field(description="the ONNX Runtime execution provider in use")


class Status(BaseModel):
    status: str


# Open Inference Protocol (KServe v2 / Triton) -----------------------------------------------------------------------

class OipLive(BaseModel):
    live: bool


class OipReady(BaseModel):
    ready: bool


class OipTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensor]
    outputs: list[OipTensor]


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipError(BaseModel):
    error: str


# Decision record ----------------------------------------------------------------------------------------------------

class DecisionRecord(BaseModel):
    """One row of the decision record (service/record/schema.py): no patient data, no file name, no key."""

    id: int = Field(description="record order; pass the last one as after_id for the next page")
    decided_at: datetime
    request_id: str
    source: str = Field(description="api, or the DICOM path (stow-rs, c-store) the image came by")
    model_name: str
    model_version: str
    model_sha256: str = Field(description="sha256 of the bundle's ONNX graph")
    image_sha256: str = Field(description="sha256 of the image bytes as received")
    input_format: Literal["png", "jpeg", "dicom"]
    input_width: int
    input_height: int
    input_bytes: int
    diagnosis: str
    probabilities: dict[str, float]
    decision: Literal["accept", "reject"]
    shield_logit: float
    threshold: float
    key_id: str | None = Field(description="first 8 hex digits of the sha256 of the caller's API key; null when "
                                           "authentication is disabled")


class DecisionsPage(BaseModel):
    decisions: list[DecisionRecord]
    next_after_id: int | None = Field(description="after_id of the next page; null on the last page")
