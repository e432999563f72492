"""The server's ``auth`` block: tokens, refusals, expiry, refresh, joins."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from mycel.testing import App, eventually, free_port, running
from testsupport.auth import SECRET, make_token, unsigned_token
from testsupport.graphql import RawSocket

OTHER_SECRET = "another-secret-that-is-32-bytes-long!!"

FLOWS = """
connector "mem" {{ type = "memory" }}
connector "gql" {{
  type = "graphql"
  port = {port}
  allowed_origins = ["https://app.example"]
  subscriptions {{ keepalive = "0s" }}
  auth {{
    required = {required}
    {join_if}
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
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.user_id == context.user.sub"
  }}
}}
flow "prices" {{
  from {{ connector = "mem"  operation = "prices" }}
  to {{ connector = "gql"  operation = "Subscription.priceChanged" }}
}}
"""

ORDERS = {"query": "subscription { orderUpdated }"}
PRICES = {"query": "subscription { priceChanged }"}


token = make_token


unsigned = unsigned_token


@asynccontextmanager
async def server(
    required: bool = True, join_if: str = ""
) -> AsyncIterator[tuple[App, str]]:
    port = free_port()
    config = FLOWS.format(
        port=port,
        required=str(required).lower(),
        join_if=f"join_if = {json.dumps(join_if)}" if join_if else "",
        secret=SECRET,
    )
    async with running(config) as app:
        yield app, f"ws://127.0.0.1:{port}/graphql"


@asynccontextmanager
async def socket(
    url: str,
    protocol: str = "graphql-transport-ws",
    headers: dict[str, str] | None = None,
    origin: str | None = None,
) -> AsyncIterator[RawSocket]:
    async with websockets.connect(
        url,
        subprotocols=[protocol],  # type: ignore[list-item]
        additional_headers=headers,
        origin=origin,  # type: ignore[arg-type]
    ) as connection:
        yield RawSocket(connection)


async def refused(url: str, **kwargs: Any) -> tuple[int, str, str | None]:
    with pytest.raises(InvalidStatus) as info:
        async with socket(url, **kwargs):
            pass
    response = info.value.response
    return (
        response.status_code,
        response.body.decode(),
        response.headers.get("WWW-Authenticate"),
    )


async def subscribers(app: App, field: str, count: int) -> None:
    hub = app.connector("gql").services.hub
    await eventually(lambda: hub.topic_size(field) == count)


def order(op_id: str, user: str, n: int) -> dict[str, Any]:
    return {
        "id": op_id,
        "type": "next",
        "payload": {"data": {"orderUpdated": {"user_id": user, "n": n}}},
    }


async def test_claims_not_params_decide_whose_events_a_client_gets() -> None:
    async with server() as (app, url), socket(url) as alice, socket(url) as bob:
        # Bob claims to be Alice every way a client can; only his token counts.
        await alice.init({"token": token("alice")})
        assert await bob.init(
            {"token": token("bob"), "sub": "alice", "user": {"sub": "alice"}}
        ) == {"type": "connection_ack"}
        await alice.send({"id": "a", "type": "subscribe", "payload": ORDERS})
        await bob.send({"id": "b", "type": "subscribe", "payload": ORDERS})
        await subscribers(app, "orderUpdated", 2)
        await app.publish("mem", "orders", {"user_id": "alice", "n": 1})
        await app.publish("mem", "orders", {"user_id": "bob", "n": 2})
        assert await alice.recv() == order("a", "alice", 1)
        assert await bob.recv() == order("b", "bob", 2)


async def test_context_holds_claims_and_params_without_the_token() -> None:
    async with server() as (app, url), socket(url) as ws:
        credential = token("alice", tenant="acme")
        await ws.init({"token": credential, "theme": "dark"})
        await ws.send({"id": "a", "type": "subscribe", "payload": ORDERS})
        await subscribers(app, "orderUpdated", 1)
        (connection,) = app.connector("gql").server.connections
        sub, _ = connection.operations["a"]
        assert sub.context["params"] == {"theme": "dark"}
        assert sub.context["connection_params"] == {"theme": "dark"}
        assert sub.context["user"] == jwt.decode(
            credential, SECRET, algorithms=["HS256"], audience="dashboard"
        )


BAD_TOKENS = {
    "forged": (lambda: token(key=OTHER_SECRET), "bad signature"),
    "expired": (lambda: token(lifetime=-60), "token expired"),
    "wrong audience": (lambda: token(aud="billing"), "wrong audience"),
    "wrong algorithm": (
        lambda: token(algorithm="HS384", key=SECRET + "x" * 16),
        "algorithm not allowed",
    ),
    "none": (unsigned, "algorithm not allowed"),
    "not a jwt": (lambda: "garbage", "malformed token"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_in_connection_init_close_4401(case: str) -> None:
    make, reason = BAD_TOKENS[case]
    async with server() as (_, url), socket(url) as ws:
        await ws.send({"type": "connection_init", "payload": {"token": make()}})
        assert await ws.closed() == (4401, reason)


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_in_the_query_string_get_401(case: str) -> None:
    make, reason = BAD_TOKENS[case]
    async with server() as (_, url):
        assert await refused(f"{url}?token={make()}") == (
            401,
            reason,
            f'Bearer realm="mycel", error="invalid_token", '
            f'error_description="{reason}"',
        )


async def test_missing_token_closes_4401_after_connection_init() -> None:
    async with server() as (_, url), socket(url) as ws:
        await ws.send({"type": "connection_init", "payload": {"userId": "alice"}})
        assert await ws.closed() == (4401, "token missing")


async def test_legacy_protocol_refuses_with_connection_error_and_4401() -> None:
    async with server() as (_, url), socket(url, "graphql-ws") as ws:
        await ws.send({"type": "connection_init", "payload": {"token": "garbage"}})
        assert await ws.recv() == {
            "type": "connection_error",
            "payload": {"message": "malformed token"},
        }
        assert await ws.closed() == (4401, "malformed token")


async def test_token_in_header_or_query_string_is_taken_at_the_handshake() -> None:
    async with server() as (app, url):
        bearer = {"Authorization": f"Bearer {token('alice')}"}
        async with socket(url, headers=bearer) as by_header:
            assert await by_header.init() == {"type": "connection_ack"}
            await by_header.send({"id": "a", "type": "subscribe", "payload": ORDERS})
            async with socket(f"{url}?token={token('bob')}") as by_query:
                assert await by_query.init() == {"type": "connection_ack"}
                await by_query.send({"id": "b", "type": "subscribe", "payload": ORDERS})
                await subscribers(app, "orderUpdated", 2)
                await app.publish("mem", "orders", {"user_id": "bob", "n": 1})
                await app.publish("mem", "orders", {"user_id": "alice", "n": 2})
                assert await by_header.recv() == order("a", "alice", 2)
                assert await by_query.recv() == order("b", "bob", 1)


async def test_disallowed_origin_gets_403_before_the_upgrade() -> None:
    async with server() as (_, url):
        assert await refused(url, origin="https://evil.example") == (
            403,
            "origin not allowed",
            None,
        )
        async with socket(url, origin="https://app.example") as ws:
            assert await ws.init({"token": token()}) == {"type": "connection_ack"}


async def test_anonymous_clients_get_only_events_that_need_no_user() -> None:
    async with server(required=False) as (app, url), socket(url) as ws:
        assert await ws.init({"userId": "alice"}) == {"type": "connection_ack"}
        await ws.send({"id": "o", "type": "subscribe", "payload": ORDERS})
        await ws.send({"id": "p", "type": "subscribe", "payload": PRICES})
        await subscribers(app, "orderUpdated", 1)
        await subscribers(app, "priceChanged", 1)
        await app.publish("mem", "orders", {"user_id": "alice", "n": 1})
        await app.publish("mem", "prices", {"price": 3})
        assert await ws.recv() == {
            "id": "p",
            "type": "next",
            "payload": {"data": {"priceChanged": {"price": 3}}},
        }
        # A bad token is refused even where a token is optional.
        async with socket(url) as bad:
            await bad.send({"type": "connection_init", "payload": {"token": "x"}})
            assert await bad.closed() == (4401, "malformed token")


async def test_expired_token_closes_4001_unless_refreshed_by_ping() -> None:
    async with server() as (_, url), socket(url) as kept, socket(url) as dropped:
        await kept.init({"token": token(lifetime=2)})
        await dropped.init({"token": token(lifetime=2)})
        fresh = token(lifetime=300)
        await kept.send({"type": "ping", "payload": {"token": fresh}})
        expires_at = jwt.decode(fresh, options={"verify_signature": False})["exp"]
        assert await kept.recv() == {
            "type": "pong",
            "payload": {"expires_at": expires_at},
        }
        assert await dropped.closed() == (4001, "token expired")
        # The refreshed connection outlived the same first deadline.
        await kept.send({"type": "ping"})
        assert await kept.recv() == {"type": "pong"}


async def test_refresh_for_another_user_is_refused_in_the_pong() -> None:
    async with server() as (_, url), socket(url) as ws:
        await ws.init({"token": token("alice")})
        await ws.send({"type": "ping", "payload": {"token": token("bob")}})
        assert await ws.recv() == {
            "type": "pong",
            "payload": {"error": "token is for another identity"},
        }
        await ws.send({"type": "ping", "payload": {"token": token(lifetime=-60)}})
        assert await ws.recv() == {
            "type": "pong",
            "payload": {"error": "token expired"},
        }


async def test_join_if_restricts_subscription_fields() -> None:
    rule = "room != 'priceChanged' || context.user.sub == 'admin'"
    async with server(join_if=rule) as (app, url), socket(url) as ws:
        await ws.init({"token": token("alice")})
        await ws.send({"id": "p", "type": "subscribe", "payload": PRICES})
        assert await ws.recv() == {
            "id": "p",
            "type": "error",
            "payload": [{"message": "not allowed to join 'priceChanged'"}],
        }
        async with socket(url) as admin:
            await admin.init({"token": token("admin")})
            await admin.send({"id": "p", "type": "subscribe", "payload": PRICES})
            await subscribers(app, "priceChanged", 1)
            await app.publish("mem", "prices", {"price": 1})
            assert (await admin.recv())["payload"] == {
                "data": {"priceChanged": {"price": 1}}
            }
        await ws.send({"id": "o", "type": "subscribe", "payload": ORDERS})
        await subscribers(app, "orderUpdated", 1)


async def test_a_short_secret_stops_the_configuration() -> None:
    config = FLOWS.format(port=free_port(), required="true", join_if="", secret="x")
    with pytest.raises(Exception) as info:
        async with running(config):
            pass
    assert "secret is 1 bytes; HS256 needs at least 32" in str(info.value)


async def test_timer_is_cancelled_when_the_connection_ends() -> None:
    async with server() as (app, url):
        async with socket(url) as ws:
            await ws.init({"token": token()})
            (connection,) = app.connector("gql").server.connections
            assert connection.expiry.pending
        await eventually(lambda: not connection.expiry.pending)


async def test_reference_client_authenticates_with_connection_params(
    graphql_js_client: Callable[..., Any],
) -> None:
    async with server() as (app, url):
        args = {
            "url": url,
            "query": "subscription { orderUpdated }",
            "count": 1,
            "connectionParams": {"token": token("alice"), "userId": "bob"},
        }
        async with graphql_js_client("subscribe.mjs", args) as client:
            assert await client.line() == {"event": "connected"}
            await subscribers(app, "orderUpdated", 1)
            await app.publish("mem", "orders", {"user_id": "bob", "n": 1})
            await app.publish("mem", "orders", {"user_id": "alice", "n": 2})
            assert await client.line() == {
                "event": "next",
                "payload": {"data": {"orderUpdated": {"user_id": "alice", "n": 2}}},
            }
        args["connectionParams"] = {"token": token(key=OTHER_SECRET)}
        async with graphql_js_client("subscribe.mjs", args) as client:
            assert await client.line() == {
                "event": "closed",
                "code": 4401,
                "reason": "bad signature",
            }
