"""API-key authentication: `X-API-Key: <key>` or `Authorization: Bearer <key>`, constant-time comparison.

A matched key is known downstream only by its `key_id` (`request.state.api_key_id`): the first 8 hex digits of its
sha256, stable across restarts and replicas, enough to tell a deployment's few keys apart, useless to authenticate.
Its scope (`request.state.scope`: full or coarse, config.Settings.scoped_api_keys) decides how much an answer says.

Failed authentications are logged (client address and reason, never the presented key) and counted per client
address; beyond `auth_failure_limit` in `auth_failure_window_seconds` the address gets 429 + Retry-After without its
key being checked, so that guessing stops paying off. The address is the TCP peer, or the `X-Forwarded-For` client
when uvicorn trusts the proxy (`FORWARDED_ALLOW_IPS`): behind a proxy, set it, or every client shares one budget.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

import structlog
from fastapi import Request
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from service.config import Scope
from service.errors import AuthThrottled, Forbidden, Unauthorized

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aegis"'}
log = structlog.get_logger("aegis.auth")


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_id(key: bytes) -> str:
    """The non-secret id of an API key (decision record, logs)."""
    return hashlib.sha256(key).hexdigest()[:8]


def matching_key(presented: str, keys: tuple[bytes, ...]) -> bytes | None:
    """Compare against every key with `hmac.compare_digest` (no early exit, so timing does not reveal which)."""
    candidate = presented.encode("utf-8", errors="replace")
    found = None
    for key in keys:
        if hmac.compare_digest(candidate, key):
            found = key
    return found


def key_matches(presented: str, keys: tuple[bytes, ...]) -> bool:
    return matching_key(presented, keys) is not None


class FailedAuthLimiter:
    """Failed authentications per client address in a moving window (the `limits` package, in memory)."""

    def __init__(self, limit: int, window_seconds: int):
        self.item = RateLimitItemPerSecond(limit, window_seconds)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None while it is under the limit."""
        if self.limiter.test(self.item, client):
            return None
        reset, _ = self.limiter.get_window_stats(self.item, client)
        return max(1, math.ceil(reset - time.time()))

    def failed(self, client: str) -> None:
        self.limiter.hit(self.item, client)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _refuse(request: Request, limiter: FailedAuthLimiter, client: str, reason: str, message: str) -> Unauthorized:
    limiter.failed(client)
    log.warning("auth_failed", client=client, reason=reason, route=request.url.path,
                request_id=getattr(request.state, "request_id", None))
    return Unauthorized(message, headers=CHALLENGE)


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for the protected routes; a no-op (default scope) when auth is explicitly disabled."""
    state = request.app.state.aegis
    if state.settings.auth_disabled:
        request.state.scope = state.settings.default_scope
        return
    limiter: FailedAuthLimiter = state.auth_limiter
    client = client_address(request)
    wait = limiter.retry_after(client)
    if wait is not None:
        log.warning("auth_throttled", client=client, route=request.url.path, retry_after_seconds=wait,
                    request_id=getattr(request.state, "request_id", None))
        raise AuthThrottled(f"too many failed authentications from this address; retry in {wait} s",
                            headers={"Retry-After": str(wait)})
    key = presented_key(request)
    if key is None:
        raise _refuse(request, limiter, client, "missing_key",
                      "missing API key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
    matched = matching_key(key, tuple(state.api_keys))
    if matched is None:
        raise _refuse(request, limiter, client, "invalid_key", "invalid API key")
    request.state.api_key_id = key_id(matched)
    request.state.scope = state.api_keys[matched]


def request_scope(request: Request) -> Scope:
    return getattr(request.state, "scope", None) or request.app.state.aegis.settings.default_scope


async def require_full_scope(request: Request) -> None:
    """For routes that reveal scores or thresholds (model manifest, decision record, metrics): a `coarse` key gets
    403, or it could read there what its answers leave out."""
    await require_api_key(request)
    if request_scope(request) != "full":
        raise Forbidden("this API key has the coarse scope: scores, thresholds and metrics need a key with the full "
                        "scope")
