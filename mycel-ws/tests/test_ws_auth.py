"""The ``auth`` block: verified tokens, refusals, expiry, refresh, joins."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mycel.testing import App, eventually, free_port, running, write_config
from testsupport.auth import SECRET, make_token
from testsupport.ws import next_item, receive, ws_config

OTHER_SECRET = "a-different-secret-of-at-least-32-bytes!"

FLOWS = """
flow "mine" {
  from { connector = "mem"  operation = "orders" }
  to {
    connector = "ws"
    operation = "broadcast"
    filter    = "input.user_id == context.user.sub"
  }
}
flow "all" {
  from { connector = "mem"  operation = "news" }
  to   { connector = "ws"   operation = "broadcast" }
}
flow "tenant" {
  from { connector = "mem"  operation = "tenant" }
  to   { connector = "ws"   operation = "room:acme:orders" }
}
flow "connections" {
  from { connector = "ws"   operation = "connect" }
  to   { connector = "mem"  target = "connected" }
}
"""


def settings(required: bool = True) -> str:
    return f"""
      allowed_origins = ["https://*.example.com"]
      auth {{
        required = {str(required).lower()}
        join_if  = "context.user.tenant == room.split(':')[0]"
        jwt {{
          secret     = "{SECRET}"
          audience   = "dashboard"
          issuer     = "https://login.example.com"
          algorithms = ["HS256"]
          leeway     = "0s"
        }}
      }}
    """


token = functools.partial(make_token, iss="https://login.example.com", tenant="acme")


def server(required: bool = True) -> Any:
    port = free_port()
    return running(ws_config(port, settings(required), FLOWS)), (
        f"ws://127.0.0.1:{port}/ws"
    )


async def refusal(url: str, **options: Any) -> tuple[int, str, str | None]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **options):
            pass
    response = info.value.response
    return (
        response.status_code,
        response.body.decode(),
        response.headers.get("WWW-Authenticate"),
    )


async def clients(app: App, count: int) -> None:
    connector = app.connector("ws")
    await eventually(lambda: connector.connection_count == count)


async def closed_with(client: Any) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await receive(client)
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


async def test_a_client_cannot_read_another_users_events_by_its_query() -> None:
    runtime, url = server()
    async with runtime as app:
        connected = app.listen("mem", "connected")
        async with (
            connect(f"{url}?token={token('alice')}") as alice,
            connect(f"{url}?token={token('bob')}&user_id=alice&sub=alice") as bob,
        ):
            await next_item(connected)
            await next_item(connected)
            await app.publish("mem", "orders", {"user_id": "alice", "n": 1})
            await app.publish("mem", "orders", {"user_id": "bob", "n": 2})
            assert await receive(alice) == {
                "type": "message",
                "data": {"user_id": "alice", "n": 1},
            }
            assert await receive(bob) == {
                "type": "message",
                "data": {"user_id": "bob", "n": 2},
            }


async def test_the_token_parameter_reaches_no_flow() -> None:
    runtime, url = server()
    async with runtime as app:
        connected = app.listen("mem", "connected")
        async with connect(f"{url}?token={token('alice')}&theme=dark"):
            _, event = await next_item(connected)
            assert event["params"] == {"theme": "dark"}


BAD_TOKENS = {
    "forged": (lambda: token(key=OTHER_SECRET), "bad signature"),
    "expired": (lambda: token(lifetime=-60), "token expired"),
    "wrong audience": (lambda: token(aud="billing"), "wrong audience"),
    "wrong issuer": (lambda: token(iss="https://evil.example"), "wrong issuer"),
    "wrong algorithm": (
        lambda: token(algorithm="HS512", key=SECRET * 2),
        "algorithm not allowed",
    ),
    "none": (
        lambda: jwt.encode({"sub": "alice", "aud": "dashboard"}, None, "none"),
        "algorithm not allowed",
    ),
    "no sub": (lambda: token(sub=None), "missing claim 'sub'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_get_401_before_the_upgrade(case: str) -> None:
    make, reason = BAD_TOKENS[case]
    runtime, url = server()
    async with runtime:
        assert await refusal(f"{url}?token={make()}") == (
            401,
            reason + "\n",
            f'Bearer realm="mycel", error="invalid_token", '
            f'error_description="{reason}"',
        )
        # The header is read too, and refused the same way.
        headers = {"Authorization": f"Bearer {make()}"}
        assert (await refusal(url, additional_headers=headers))[:2] == (
            401,
            reason + "\n",
        )


async def test_missing_token_gets_401_when_required() -> None:
    runtime, url = server()
    async with runtime:
        assert await refusal(f"{url}?user_id=alice") == (
            401,
            "token missing\n",
            'Bearer realm="mycel"',
        )


async def test_header_token_authenticates() -> None:
    runtime, url = server()
    async with runtime as app:
        headers = {"Authorization": f"Bearer {token('bob')}"}
        async with connect(url, additional_headers=headers) as bob:
            await clients(app, 1)
            await app.publish("mem", "orders", {"user_id": "bob", "n": 1})
            assert await receive(bob) == {
                "type": "message",
                "data": {"user_id": "bob", "n": 1},
            }


async def test_anonymous_clients_get_only_events_that_need_no_user() -> None:
    runtime, url = server(required=False)
    async with runtime as app, connect(f"{url}?user_id=alice") as anonymous:
        await clients(app, 1)
        await app.publish("mem", "orders", {"user_id": "alice", "n": 1})
        await app.publish("mem", "news", {"headline": "hi"})
        assert await receive(anonymous) == {
            "type": "message",
            "data": {"headline": "hi"},
        }
        # A bad token is refused even where a token is optional.
        assert (await refusal(f"{url}?token=garbage"))[:2] == (
            401,
            "malformed token\n",
        )


async def test_origin_outside_allowed_wildcard_gets_403() -> None:
    runtime, url = server()
    async with runtime:
        assert (await refusal(url, origin="https://example.com"))[:2] == (
            403,
            "origin 'https://example.com' is not allowed\n",
        )
        async with connect(
            f"{url}?token={token()}", origin="https://app.example.com"
        ) as client:
            await client.send(json.dumps({"type": "join_room", "room": "acme:x"}))
            assert await receive(client) == {"type": "joined", "room": "acme:x"}


async def test_join_if_guards_join_room_frames() -> None:
    runtime, url = server()
    async with runtime as app, connect(f"{url}?token={token()}") as client:
        await client.send(json.dumps({"type": "join_room", "room": "globex:orders"}))
        assert await receive(client) == {
            "type": "error",
            "message": "not allowed to join 'globex:orders'",
        }
        await client.send(json.dumps({"type": "join_room", "room": "acme:orders"}))
        assert await receive(client) == {"type": "joined", "room": "acme:orders"}
        await app.publish("mem", "tenant", {"n": 1})
        assert await receive(client) == {
            "type": "message",
            "room": "acme:orders",
            "data": {"n": 1},
        }


async def test_join_if_guards_rooms_in_the_handshake() -> None:
    runtime, url = server(required=False)
    async with runtime:
        assert await refusal(f"{url}?token={token()}&rooms=acme:a,globex:b") == (
            403,
            "not allowed to join 'globex:b'\n",
            None,
        )
        # Anonymous connections have no tenant: they join nothing.
        assert (await refusal(f"{url}?rooms=acme:a"))[:2] == (
            403,
            "not allowed to join 'acme:a'\n",
        )
        async with connect(f"{url}?token={token()}&rooms=acme:a") as client:
            assert await receive(client) == {"type": "joined", "room": "acme:a"}


async def test_expired_token_closes_4001_unless_refreshed() -> None:
    runtime, url = server()
    async with (
        runtime,
        connect(f"{url}?token={token(lifetime=2)}") as kept,
        connect(f"{url}?token={token(lifetime=2)}") as dropped,
    ):
        fresh = token(lifetime=300)
        await kept.send(json.dumps({"type": "auth", "token": fresh}))
        expires_at = jwt.decode(fresh, options={"verify_signature": False})["exp"]
        assert await receive(kept) == {
            "type": "authenticated",
            "expires_at": expires_at,
        }
        assert await closed_with(dropped) == (4001, "token expired")
        # The refreshed connection outlived the same first deadline.
        await kept.send(json.dumps({"type": "join_room", "room": "acme:a"}))
        assert await receive(kept) == {"type": "joined", "room": "acme:a"}


async def test_refresh_refusals_are_error_frames() -> None:
    runtime, url = server()
    async with runtime, connect(f"{url}?token={token('alice')}") as client:
        for fresh, reason in [
            (token("bob"), "token is for another identity"),
            (token(tenant="globex"), "token is for another identity"),
            (token(key=OTHER_SECRET), "bad signature"),
            ("", 'an auth frame needs "token", a non-empty string'),
        ]:
            await client.send(json.dumps({"type": "auth", "token": fresh}))
            assert await receive(client) == {"type": "error", "message": reason}


async def test_auth_frames_without_an_auth_block_are_errors() -> None:
    port = free_port()
    async with (
        running(ws_config(port)),
        connect(f"ws://127.0.0.1:{port}/ws") as client,
    ):
        await client.send(json.dumps({"type": "auth", "token": token()}))
        assert await receive(client) == {
            "type": "error",
            "message": "this server takes no auth frames (no auth block)",
        }


def hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    """A token "signed" with HS256 and ``secret``, built by hand: PyJWT
    rightly refuses to use a public key as an HMAC secret."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{part(mac)}"


async def test_public_key_file_and_cookie(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "login.pem").write_bytes(pem)
    port = free_port()
    auth = """
      auth {
        required = true
        cookie   = "session"
        jwt { public_key = "keys/login.pem" }
      }
    """
    write_config(
        ws_config(port, auth, FLOWS.split('flow "tenant"', maxsplit=1)[0]), tmp_path
    )
    url = f"ws://127.0.0.1:{port}/ws"
    claims = {"sub": "alice", "exp": int(time.time()) + 300}
    signed = jwt.encode(claims, key, algorithm="RS256")
    async with running(tmp_path) as app:
        async with connect(
            url, additional_headers={"Cookie": f"session={signed}"}
        ) as ws:
            await clients(app, 1)
            await app.publish("mem", "orders", {"user_id": "alice", "n": 1})
            assert await receive(ws) == {
                "type": "message",
                "data": {"user_id": "alice", "n": 1},
            }
        # Algorithm confusion: HS256 "signed" with the public key's PEM text.
        confused = hs256_with(pem, claims)
        assert (await refusal(f"{url}?token={confused}"))[:2] == (
            401,
            "algorithm not allowed\n",
        )
