"""Domain errors -> HTTP answers, in exactly one place. Every error body is an `ErrorResponse`."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError

log = structlog.get_logger("aegis.api")


def error_response(request: Request, status: int, reason: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request_errors.labels(reason=reason).inc()
    request.state.error_reason = reason
    return JSONResponse({"detail": detail, "reason": reason, "request_id": request_id}, status_code=status,
                        headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(request, error.status, error.reason, error.message, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(request, error.status_code, "http", str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", f"invalid request: {error.errors()}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        log.error("internal_error", error_type=type(error).__name__, path=request.url.path)
        return error_response(request, 500, "internal", "internal error; the request id identifies it in the logs")
