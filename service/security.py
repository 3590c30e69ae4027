"""API-key authentication: `X-API-Key: <key>` or `Authorization: Bearer <key>`, constant-time comparison."""

from __future__ import annotations

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


def key_matches(presented: str, keys: tuple[bytes, ...]) -> bool:
    """Compare against every key with `hmac.compare_digest` (no early exit, so timing does not reveal which)."""
    candidate = presented.encode("utf-8", errors="replace")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for the protected routes (diagnose, model); a no-op when auth is explicitly disabled."""
    state = request.app.state.aegis
    if state.settings.auth_disabled:
        return
    key = presented_key(request)
    if key is None:
        raise Unauthorized("missing API key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
                           headers=CHALLENGE)
    if not key_matches(key, state.api_keys):
        raise Unauthorized("invalid API key", headers=CHALLENGE)
