"""One pure-ASGI middleware per request: request id, header count and body size limits, request metrics, the access
log line, and `Cache-Control: no-store` on every answer that sets no caching policy itself (diagnoses, decisions
and errors must not sit in a shared cache).

`request.state.started` is when the request's first byte arrived (`service.http` records it; the ASGI call's start
otherwise): the request timeout counts from there.

The body limit is enforced twice: a declared Content-Length above `max_upload_bytes` is refused before any byte is
read, and the bytes actually received are counted while they stream in (chunked uploads, lying headers). Both raise
`PayloadTooLarge` from inside the route's body read, so the one error handler answers 413.
"""

from __future__ import annotations

import random
import re
import time

import structlog
from starlette.responses import JSONResponse

from service.errors import HeaderFieldsTooLarge, PayloadTooLarge
from service.metrics import ServiceMetrics

log = structlog.get_logger("aegis.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    """128 random bits as 32 hex digits, like uuid4().hex without its os.urandom call: that call releases the GIL, and
    under load the event loop then waits behind the decode and inference threads to get it back (py-spy found the
    loop's samples in uuid4, docs/benchmark.md). An id must be unique, not secret; `random` reseeds in forked
    children."""
    return f"{random.getrandbits(128):032x}"


class RequestContextMiddleware:
    def __init__(self, app, metrics: ServiceMetrics, max_body_bytes: int, max_header_count: int = 100):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_header_count = max_header_count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        started = state.get("first_byte") or time.perf_counter()
        raw_headers = scope.get("headers", [])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else new_request_id()
        state["request_id"] = request_id
        state["started"] = started
        state["log"] = {}
        if len(raw_headers) > self.max_header_count:  # before routing and authentication
            error = HeaderFieldsTooLarge(f"{len(raw_headers)} header lines exceed the limit of "
                                         f"{self.max_header_count}")
            self.metrics.request_errors.labels(reason=error.reason).inc()
            self.metrics.requests.labels(route="unmatched", status=str(error.status)).inc()
            response = JSONResponse({"detail": error.message, "reason": error.reason, "request_id": request_id},
                                    status_code=error.status, headers={"Connection": "close"})
            return await response(scope, receive, send)
        declared = headers.get("content-length")
        limit = self.max_body_bytes
        received = 0
        status = {"code": 500}

        async def limited_receive():
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                if not any(k.lower() == b"cache-control" for k, _ in message.get("headers", [])):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, limited_receive, tagged_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(route=template, status=str(status["code"])).inc()
            self.metrics.request_duration.labels(route=template).observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
                log.info("request", request_id=request_id, method=scope.get("method"), route=template,
                         status=status["code"], duration_seconds=round(elapsed, 6), body_bytes=received,
                         **state.get("log", {}))
