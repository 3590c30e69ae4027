"""Domain errors raised by decoding, batching and the request guards; `service.api.errors` maps them to HTTP.

Each error carries a stable machine-readable `reason` (also the label of `aegis_request_errors_total`), a
human-readable message, and the DICOM status that refuses an instance for the same cause in the DICOM protocols
(the C-STORE status of PS3.4 Annex B.2.3, also the STOW-RS Failure Reason of PS3.18): A7xx out of resources,
Cxxx cannot understand (C122: transfer syntax not supported), 0110 processing failure, 0122 SOP class not supported,
0124 not authorized. Messages never contain image bytes or DICOM patient data.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, `reason` a stable snake_case code."""

    status: int = 400
    reason: str = "bad_request"
    dicom_status: int = 0x0110  # processing failure

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class PayloadTooLarge(ServiceError):
    status, reason, dicom_status = 413, "payload_too_large", 0xA700


class TooManyPixels(ServiceError):
    status, reason, dicom_status = 413, "too_many_pixels", 0xA700


class UnsupportedMediaType(ServiceError):
    status, reason, dicom_status = 415, "unsupported_media_type", 0xC000


class UnsupportedTransferSyntax(UnsupportedMediaType):
    """Compressed DICOM whose pixel data no installed decoder reads."""

    dicom_status = 0xC122


class UndecodableImage(ServiceError):
    status, reason, dicom_status = 422, "undecodable", 0xC000


class UnsupportedImage(ServiceError):
    """Decodable but outside what the service handles (multi-frame DICOM, odd photometric interpretation)."""

    status, reason, dicom_status = 422, "unsupported_image", 0xC000


class NotAnImage(UnsupportedImage):
    """A DICOM SOP class without pixel data (a Structured Report, an Encapsulated PDF...): nothing to diagnose."""

    reason, dicom_status = "not_an_image", 0x0122


class EmptyBody(ServiceError):
    status, reason, dicom_status = 422, "empty_body", 0xC000


class MissingFile(ServiceError):
    status, reason, dicom_status = 422, "missing_file", 0xC000


class MalformedMultipart(ServiceError):
    """A STOW-RS body that is not a readable multipart/related message."""

    status, reason, dicom_status = 400, "malformed_multipart", 0xC000


class Unauthorized(ServiceError):
    status, reason, dicom_status = 401, "unauthorized", 0x0124


class Forbidden(ServiceError):
    """A valid key whose scope does not cover the route (a `coarse` key asking for scores, thresholds, metrics)."""

    status, reason = 403, "forbidden"


class AuthThrottled(ServiceError):
    """Too many failed authentications from this client address: 429 + Retry-After, the key is not even checked."""

    status, reason = 429, "auth_throttled"


class HeaderFieldsTooLarge(ServiceError):
    status, reason = 431, "header_fields_too_large"


class NotReady(ServiceError):
    status, reason, dicom_status = 503, "not_ready", 0xA700


class Overloaded(ServiceError):
    """The batch queue is full: retry after a short delay."""

    status, reason, dicom_status = 503, "overloaded", 0xA700


class RequestTimeout(ServiceError):
    """The request did not get its answer within `request_timeout_seconds`."""

    status, reason, dicom_status = 503, "timeout", 0xA700


class InferenceFailed(ServiceError):
    """The model call failed (device or runtime error): not the client's fault; details are in the logs."""

    status, reason = 500, "inference_failed"


class RecordDisabled(ServiceError):
    """GET /v1/decisions on a service started with AEGIS_RECORD_ENABLED=false."""

    status, reason = 503, "record_disabled"


class DocumentMissing(ServiceError):
    """A bundle document (e.g. the security report) that the served bundle does not carry."""

    status, reason = 404, "document_missing"
