"""Pydantic response schemas (they are the OpenAPI documentation of the answers)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str
    version: str


class InputInfo(BaseModel):
    format: Literal["png", "jpeg", "dicom"]
    width: int
    height: int


class DiagnoseResponse(BaseModel):
    request_id: str
    diagnosis: str = Field(description="the predicted class name")
    probabilities: dict[str, float] = Field(description="softmax of the classifier logits, per class name")
    decision: Literal["accept", "reject"] = Field(
        description="accept: the Shield of the predicted class judges the image clean; reject: likely adversarial "
                    "or out of distribution, do not use the diagnosis")
    shield_logit: float = Field(description="the predicted class's Shield logit (high = clean)")
    threshold: float = Field(description="accept iff shield_logit >= threshold")
    model: ModelRef
    input: InputInfo
    timings_seconds: dict[str, float] = Field(
        description="decode, prepare, cushion, queue, inference (the batch's ONNX Runtime call), total")


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, for a human")
    reason: str = Field(description="a stable machine-readable code, e.g. payload_too_large")
    request_id: str | None = None


class ModelResponse(BaseModel):
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
