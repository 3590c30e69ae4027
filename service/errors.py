"""Domain errors raised by decoding, batching and the request guards; `service.api.errors` maps them to HTTP.

Each error carries a stable machine-readable `reason` (also the label of `aegis_request_errors_total`) and a
human-readable message. Messages never contain image bytes or DICOM patient data.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, `reason` a stable snake_case code."""

    status: int = 400
    reason: str = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class PayloadTooLarge(ServiceError):
    status, reason = 413, "payload_too_large"


class TooManyPixels(ServiceError):
    status, reason = 413, "too_many_pixels"


class UnsupportedMediaType(ServiceError):
    status, reason = 415, "unsupported_media_type"


class UndecodableImage(ServiceError):
    status, reason = 422, "undecodable"


class UnsupportedImage(ServiceError):
    """Decodable but outside what the service handles (multi-frame DICOM, odd photometric interpretation)."""

    status, reason = 422, "unsupported_image"


class EmptyBody(ServiceError):
    status, reason = 422, "empty_body"


class MissingFile(ServiceError):
    status, reason = 422, "missing_file"


class Unauthorized(ServiceError):
    status, reason = 401, "unauthorized"


class NotReady(ServiceError):
    status, reason = 503, "not_ready"


class Overloaded(ServiceError):
    """The batch queue is full: retry after a short delay."""

    status, reason = 503, "overloaded"


class RequestTimeout(ServiceError):
    """The request did not get its answer within `request_timeout_seconds`."""

    status, reason = 503, "timeout"


class InferenceFailed(ServiceError):
    """The model call failed (device or runtime error): not the client's fault; details are in the logs."""

    status, reason = 500, "inference_failed"


class RecordDisabled(ServiceError):
    """GET /v1/decisions on a service started with AEGIS_RECORD_ENABLED=false."""

    status, reason = 503, "record_disabled"


class DocumentMissing(ServiceError):
    """A bundle document (e.g. the security report) that the served bundle does not carry."""

    status, reason = 404, "document_missing"
