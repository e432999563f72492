"""Signed test tokens for the auth tests of every connector."""

from __future__ import annotations

import time
from typing import Any

import jwt

SECRET = "mycel-test-secret-of-at-least-32-bytes!!"
"""The HMAC secret the tests' ``auth`` blocks are configured with."""


def make_token(
    sub: str = "alice",
    *,
    key: Any = SECRET,
    algorithm: str = "HS256",
    lifetime: float = 300,
    **claims: Any,
) -> str:
    """A JWT for ``sub`` with audience "dashboard", expiring in ``lifetime``.

    ``claims`` add to or replace the standard ones.
    """
    body: dict[str, Any] = {
        "sub": sub,
        "aud": "dashboard",
        "exp": int(time.time() + lifetime),
        **claims,
    }
    return jwt.encode(body, key, algorithm=algorithm)


def unsigned_token(sub: str = "alice") -> str:
    """A token with ``alg: none``, which every connector must refuse."""
    body = {"sub": sub, "aud": "dashboard", "exp": int(time.time() + 300)}
    return jwt.encode(body, None, algorithm="none")
