"""API-key authentication: `X-API-Key: <key>` or `Authorization: Bearer <key>`, constant-time comparison.

A matched key is known downstream only by its `key_id` (`request.state.api_key_id`): the first 8 hex digits of its
sha256, stable across restarts and replicas, enough to tell a deployment's few keys apart, useless to authenticate.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from service.errors import Unauthorized

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aegis"'}


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


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for the protected routes (diagnose, model); a no-op when auth is explicitly disabled."""
    state = request.app.state.aegis
    if state.settings.auth_disabled:
        return
    key = presented_key(request)
    if key is None:
        raise Unauthorized("missing API key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
                           headers=CHALLENGE)
    matched = matching_key(key, state.api_keys)
    if matched is None:
        raise Unauthorized("invalid API key", headers=CHALLENGE)
    request.state.api_key_id = key_id(matched)
