"""The ``auth`` block of the sse connector: tokens, refusals, expiry, joins."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mycel.testing import App, running, write_config
from mycel_sse import SseConnector
from testsupport.auth import SECRET, make_token
from testsupport.sse import SseEvent, open_stream

OTHER_SECRET = "a-different-secret-of-at-least-32-bytes!"

CONFIG = """
connector "mem" {{ type = "memory" }}
connector "sse" {{
  type = "sse"
  port = 0
  cors {{ origins = ["https://app.example.com"] }}
  auth {{
    required = {required}
    join_if  = "context.user.tenant == room.split('-')[0]"
    jwt {{
      secret     = "{secret}"
      audience   = "dashboard"
      algorithms = ["HS256"]
      leeway     = "0s"
    }}
  }}
}}
flow "orders" {{
  from {{ connector = "mem"  operation = "orders" }}
  to {{
    connector = "sse"
    operation = "stream:acme-orders"
    filter    = "input.user_id == context.user.sub"
  }}
}}
flow "globex" {{
  from {{ connector = "mem"  operation = "globex" }}
  to   {{ connector = "sse"  operation = "stream:globex-orders" }}
}}
flow "news" {{
  from {{ connector = "mem"  operation = "news" }}
  to   {{ connector = "sse"  operation = "broadcast" }}
}}
"""


def config(required: bool = True) -> str:
    return CONFIG.format(required=str(required).lower(), secret=SECRET)


token = functools.partial(make_token, tenant="acme")


def base_url(app: App) -> str:
    connector = app.connector("sse")
    assert isinstance(connector, SseConnector)
    return f"http://127.0.0.1:{connector.port}/events"


async def publish(app: App, topic: str, payload: object) -> None:
    await app.publish("mem", topic, payload)
    await app.memory("mem").drain()


async def get(url: str, **headers: str) -> tuple[int, Any, str | None]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(url, headers=headers)
    return (
        response.status_code,
        response.json(),
        response.headers.get("www-authenticate"),
    )


async def test_a_client_cannot_read_another_users_events_by_its_query() -> None:
    async with running(config()) as app:
        url = f"{base_url(app)}/acme-orders"
        async with (
            open_stream(f"{url}?token={token('alice')}") as alice,
            open_stream(f"{url}?token={token('bob')}&user_id=alice&sub=alice") as bob,
        ):
            await publish(app, "orders", {"user_id": "alice", "n": 1})
            await publish(app, "orders", {"user_id": "bob", "n": 2})
            assert json.loads((await alice.event()).data) == {
                "user_id": "alice",
                "n": 1,
            }
            assert json.loads((await bob.event()).data) == {"user_id": "bob", "n": 2}


async def test_context_has_claims_and_params_without_the_token() -> None:
    async with running(config()) as app:
        connector = app.connector("sse")
        credential = token("alice")
        async with open_stream(
            f"{base_url(app)}/acme-orders?token={credential}&theme=dark"
        ):
            (sub,) = connector.services.hub.subscribers
            assert sub.context == {
                "params": {"theme": "dark"},
                "user": jwt.decode(credential, SECRET, ["HS256"], audience="dashboard"),
                "stream": "acme-orders",
            }


BAD_TOKENS = {
    "forged": (lambda: token(key=OTHER_SECRET), "bad signature"),
    "expired": (lambda: token(lifetime=-60), "token expired"),
    "wrong audience": (lambda: token(aud="billing"), "wrong audience"),
    "wrong algorithm": (
        lambda: token(algorithm="HS512", key=SECRET * 2),
        "algorithm not allowed",
    ),
    "none": (
        lambda: jwt.encode({"sub": "alice", "aud": "dashboard"}, None, "none"),
        "algorithm not allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_get_401(case: str) -> None:
    make, reason = BAD_TOKENS[case]
    challenge = (
        f'Bearer realm="mycel", error="invalid_token", error_description="{reason}"'
    )
    async with running(config(required=False)) as app:
        url = f"{base_url(app)}/acme-orders"
        assert await get(f"{url}?token={make()}") == (
            401,
            {"error": reason},
            challenge,
        )
        assert await get(url, authorization=f"Bearer {make()}") == (
            401,
            {"error": reason},
            challenge,
        )


async def test_missing_token_gets_401_when_required() -> None:
    async with running(config()) as app:
        assert await get(f"{base_url(app)}/acme-orders?user_id=alice") == (
            401,
            {"error": "token missing"},
            'Bearer realm="mycel"',
        )


async def test_anonymous_clients_get_only_events_that_need_no_user() -> None:
    async with running(config(required=False)) as app:
        async with open_stream(base_url(app)) as anonymous:
            await publish(app, "news", {"headline": "hi"})
            assert json.loads((await anonymous.event()).data) == {"headline": "hi"}
        # join_if needs a tenant: anonymous clients open no named stream.
        assert await get(f"{base_url(app)}/acme-orders") == (
            403,
            {"error": "not allowed to join 'acme-orders'"},
            None,
        )


async def test_join_if_guards_stream_names() -> None:
    async with running(config()) as app:
        url = base_url(app)
        assert await get(f"{url}/globex-orders?token={token()}") == (
            403,
            {"error": "not allowed to join 'globex-orders'"},
            None,
        )
        globex = token("carol", tenant="globex")
        async with open_stream(f"{url}/globex-orders?token={globex}") as stream:
            await publish(app, "globex", {"n": 1})
            assert json.loads((await stream.event()).data) == {"n": 1}


async def test_disallowed_origin_gets_403() -> None:
    async with running(config()) as app:
        url = f"{base_url(app)}/acme-orders?token={token()}"
        assert await get(url, origin="https://evil.example") == (
            403,
            {"error": "origin not allowed"},
            None,
        )
        async with open_stream(url, {"origin": "https://app.example.com"}) as ok:
            assert ok.response.headers["access-control-allow-origin"] == (
                "https://app.example.com"
            )


async def test_expired_token_ends_the_stream_with_token_expired() -> None:
    async with running(config()) as app:
        url = f"{base_url(app)}/acme-orders?token={token(lifetime=2)}"
        async with open_stream(url) as stream:
            assert await stream.rest() == [
                SseEvent('{"message": "token expired"}', "token_expired")
            ]
        assert app.connector("sse").services.hub.topic_size("acme-orders") == 0


async def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    config = CONFIG.format(required="true", secret="").replace(
        'secret     = ""', 'jwks_file = "jwks.json"'
    )
    config = config.replace('algorithms = ["HS256"]', "")
    write_config(config, tmp_path)
    claims = {"sub": "alice", "aud": "dashboard", "tenant": "acme"}
    claims["exp"] = int(time.time()) + 300
    async with running(tmp_path) as app:
        url = f"{base_url(app)}/acme-orders"
        good = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
        async with open_stream(url, {"authorization": f"Bearer {good}"}) as stream:
            await publish(app, "orders", {"user_id": "alice", "n": 1})
            assert json.loads((await stream.event()).data) == {
                "user_id": "alice",
                "n": 1,
            }
        other = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k2"})
        assert (await get(f"{url}?token={other}"))[:2] == (
            401,
            {"error": "unknown key"},
        )
