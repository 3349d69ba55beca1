"""API keys (--api-key): a route dependency that lets a request through only with a valid bearer token."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError


def require_api_key(request: Request) -> None:
    """Checks `Authorization: Bearer <key>` against the app's keys (app.state.api_keys); no keys, no check."""
    expected: list[bytes] = request.app.state.api_keys
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Compared against every key in constant time, so the time taken reveals nothing about any key.
    matches = [hmac.compare_digest(token.strip().encode(), key) for key in expected]
    if scheme.lower() != "bearer" or not any(matches):
        raise APIError(401, "a valid API key is needed: send the header `Authorization: Bearer <key>`",
                       "authentication_error", headers={"WWW-Authenticate": "Bearer"})
