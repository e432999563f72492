"""Authenticated subscribers (issue 12): what verifying a token costs.

Run as ``python bench/bench_auth.py``. Prints one JSON object per figure:

1. Cost of authenticating one connection (finding the token in the query,
   verifying an HS256 JWT, building the context) with ``mycel.Authenticator``,
   against a bare ``jwt.decode`` of the same token with the same checks.
2. The same for RS256 (a public key), against bare ``jwt.decode``.
3. WebSocket handshakes per second (open, then close; 50 in flight) on a
   ``websocket`` connector with ``auth`` and a query-string token, against
   the same connector without ``auth`` (best of three alternating rounds).

Nothing here is a test.

"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect

import mycel
from mycel.testing import free_port, running

SECRET = "bench-auth-secret-of-at-least-32-bytes!!"
VERIFY_ROUNDS = 20_000
HANDSHAKES = 2_000
IN_FLIGHT = 50


def emit(**figure: Any) -> None:
    print(json.dumps({"bench": "auth", **figure}), flush=True)


def claims() -> dict[str, Any]:
    return {
        "sub": "alice",
        "aud": "dashboard",
        "tenant": "acme",
        "exp": int(time.time()) + 3600,
    }


def per_call_us(function: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(rounds):
            function()
        best = min(best, time.perf_counter() - start)
    return best / rounds * 1e6


def verify_figure(name: str, jwt_block: dict[str, Any], sign: Any, verify: Any) -> None:
    settings = mycel.AuthSettings.model_validate(
        {"required": True, "jwt": {"audience": "dashboard", **jwt_block}}
    )
    auth = mycel.Authenticator(settings)
    token = sign(claims())
    query = {"token": token, "user_id": "7"}
    rounds = VERIFY_ROUNDS if name == "HS256" else VERIFY_ROUNDS // 10

    def mycel_way() -> None:
        identity = auth.authenticate(None, query, None)
        auth.build_context(query, identity, {"id": "1"})

    def bare() -> None:
        verify(token)

    value = per_call_us(mycel_way, rounds)
    baseline = per_call_us(bare, rounds)
    emit(
        figure=f"authenticate one connection ({name})",
        unit="µs/connection",
        value=round(value, 2),
        baseline_name="bare jwt.decode",
        baseline=round(baseline, 2),
        ratio=round(baseline / value, 3),
        higher_is_better=False,
        aim=">= 0.8x (little over PyJWT's own cost)",
        notes="token from the query, claims checked (exp, aud, sub), context built",
    )


async def handshakes(url: str) -> float:
    count = 0

    async def worker(n: int) -> None:
        nonlocal count
        for _ in range(n):
            async with connect(url, compression=None):
                count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(HANDSHAKES // IN_FLIGHT) for _ in range(IN_FLIGHT)))
    return count / (time.perf_counter() - start)


async def handshake_figure() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    plain, authed = free_port(), free_port()
    # One runtime, both connectors; rounds alternate so that the load of a
    # shared machine weighs on both alike.
    config = f"""
    connector "plain" {{
      type = "websocket"
      port = {plain}
    }}
    connector "authed" {{
      type = "websocket"
      port = {authed}
      auth {{
        required = true
        jwt {{
          secret   = "{SECRET}"
          audience = "dashboard"
        }}
      }}
    }}
    """
    rates: dict[str, float] = {"plain": 0.0, "auth": 0.0}
    async with running(config):
        urls = {
            "plain": f"ws://127.0.0.1:{plain}/ws?token={token}",
            "auth": f"ws://127.0.0.1:{authed}/ws?token={token}",
        }
        for url in urls.values():
            await handshakes(url)  # warm up
        for _ in range(3):
            for name, url in urls.items():
                rates[name] = max(rates[name], await handshakes(url))
    emit(
        figure="WebSocket handshakes per second",
        unit="handshakes/s",
        value=round(rates["auth"]),
        baseline_name="same connector without auth",
        baseline=round(rates["plain"]),
        ratio=round(rates["auth"] / rates["plain"], 3),
        higher_is_better=True,
        aim=">= 0.9x",
        notes=f"{HANDSHAKES} open+close, {IN_FLIGHT} in flight, client in-process",
    )


def main() -> None:
    verify_figure(
        "HS256",
        {"secret": SECRET},
        lambda c: jwt.encode(c, SECRET, algorithm="HS256"),
        lambda t: jwt.decode(
            t,
            SECRET,
            algorithms=["HS256"],
            audience="dashboard",
            options={"require": ["exp", "sub"]},
        ),
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    verify_figure(
        "RS256",
        {"public_key": pem},
        lambda c: jwt.encode(c, key, algorithm="RS256"),
        lambda t: jwt.decode(
            t,
            public,
            algorithms=["RS256"],
            audience="dashboard",
            options={"require": ["exp", "sub"]},
        ),
    )
    asyncio.run(handshake_figure())


if __name__ == "__main__":
    main()
