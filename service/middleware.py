"""One pure-ASGI middleware per request: request id, body size limit, request metrics and the access log line.

The body limit is enforced twice: a declared Content-Length above `max_upload_bytes` is refused before any byte is
read, and the bytes actually received are counted while they stream in (chunked uploads, lying headers). Both raise
`PayloadTooLarge` from inside the route's body read, so the one error handler answers 413.
"""

from __future__ import annotations

import re
import time
import uuid

import structlog

from service.errors import PayloadTooLarge
from service.metrics import ServiceMetrics

log = structlog.get_logger("aegis.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app, metrics: ServiceMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log"] = {}
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
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
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
