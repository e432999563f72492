"""The sse connector end to end: memory -> flow -> sse -> httpx clients."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import httpx
import pytest

from mycel.testing import eventually, running
from mycel_sse import SseConnector
from testsupport.sse import SseEvent, open_stream

BASE = """
connector "mem" { type = "memory" }
connector "sse" {
  type = "sse"
  port = 0
  %s
}
flow "orders" {
  from { connector = "mem"  operation = "orders" }
  to {
    connector = "sse"
    operation = "stream:orders"
    filter    = "input.user_id == context.params.user_id"
    event     = "order"
  }
}
flow "prices" {
  from { connector = "mem"  operation = "prices" }
  to   { connector = "sse"  operation = "stream:prices" }
}
flow "news" {
  from { connector = "mem"  operation = "news" }
  to   { connector = "sse"  operation = "broadcast" }
}
flow "rooms" {
  from { connector = "mem"  operation = "rooms" }
  transform { text = "input.text" }
  to   { connector = "sse"  operation = "stream:room-${input.room}" }
}
"""


def config(settings: str = "") -> str:
    return BASE % settings


def base_url(app: object) -> str:
    connector = app.connector("sse")  # type: ignore[attr-defined]
    assert isinstance(connector, SseConnector)
    return f"http://127.0.0.1:{connector.port}"


def event_id(app: object, number: int) -> str:
    connector = app.connector("sse")  # type: ignore[attr-defined]
    assert isinstance(connector, SseConnector)
    return f"{connector.epoch}-{number}"


def sample(app: object, name: str, **labels: str) -> float | None:
    registry = app.runtime.metrics.registry  # type: ignore[attr-defined]
    value: float | None = registry.get_sample_value(name, labels)
    return value


async def publish(app: object, topic: str, payload: object) -> None:
    await app.publish("mem", topic, payload)  # type: ignore[attr-defined]
    await app.memory("mem").drain()  # type: ignore[attr-defined]


async def test_stream_event_carries_id_event_name_and_json_data() -> None:
    async with running(config()) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/orders?user_id=7") as stream:
            assert stream.response.headers["content-type"] == (
                "text/event-stream; charset=utf-8"
            )
            assert stream.response.headers["cache-control"] == "no-store"
            await publish(app, "orders", {"user_id": 7, "total": 9.5, "note": "é"})
            event = await stream.event()
    assert event == SseEvent(
        data='{"user_id":7,"total":9.5,"note":"é"}',
        event="order",
        id=event_id(app, 1),
    )


async def test_filter_on_query_parameter_skips_other_users() -> None:
    async with running(config()) as app:
        url = base_url(app)
        async with (
            open_stream(f"{url}/events/orders?user_id=1") as one,
            open_stream(f"{url}/events/orders?user_id=2") as two,
        ):
            await publish(app, "orders", {"user_id": 2, "n": 1})
            await publish(app, "orders", {"user_id": "1", "n": 2})
            await publish(app, "orders", {"user_id": 1, "n": 3})
            first = [json.loads((await one.event()).data)["n"] for _ in range(2)]
            second = json.loads((await two.event()).data)["n"]
            # A later unfiltered event proves nothing else was queued before it.
            await publish(app, "orders", {"user_id": 2, "n": 4})
            fourth = json.loads((await two.event()).data)["n"]
    assert first == [2, 3]
    assert (second, fourth) == (1, 4)


async def test_broadcast_reaches_all_streams_and_stream_events_stay_in_theirs() -> None:
    async with running(config()) as app:
        url = base_url(app)
        async with (
            open_stream(f"{url}/events") as plain,
            open_stream(f"{url}/events/prices") as prices,
            open_stream(f"{url}/events/orders?user_id=1") as orders,
        ):
            await publish(app, "prices", {"p": 1})
            await publish(app, "news", {"headline": "hello"})
            got_plain = await plain.event()
            got_prices = [await prices.event(), await prices.event()]
            got_orders = await orders.event()
    assert got_plain == SseEvent('{"headline":"hello"}', id=event_id(app, 2))
    assert got_prices == [
        SseEvent('{"p":1}', id=event_id(app, 1)),
        SseEvent('{"headline":"hello"}', id=event_id(app, 2)),
    ]
    assert got_orders == got_plain


async def test_templated_stream_name_is_rendered_per_event() -> None:
    async with running(config()) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/room-blue") as blue:
            await publish(app, "rooms", {"room": "red", "text": "no"})
            await publish(app, "rooms", {"room": "blue", "text": "yes"})
            event = await blue.event()
    assert event == SseEvent('{"text":"yes"}', id=event_id(app, 2))


async def test_invalid_rendered_stream_name_fails_the_event() -> None:
    async with running(config()) as app:
        await publish(app, "rooms", {"room": "a b", "text": "x"})
        dead = app.memory("mem").dead_letters
    assert list(dead) == [
        (
            "rooms",
            {"room": "a b", "text": "x"},
            "flow 'rooms': to 'sse' failed after 1 try: 'stream:room-a b' does "
            "not name a valid stream; use 1 to 128 letters, digits, '_', '-' "
            "or '.'",
        )
    ]


async def test_timestamps_in_payloads_are_sent_as_iso_text() -> None:
    raw = """
flow "raw" {
  from { connector = "mem"  operation = "raw" }
  transform { when = "timestamp('2024-01-01T00:00:00Z')" }
  to   { connector = "sse"  operation = "broadcast" }
}
"""
    async with running(config() + raw) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events") as plain:
            await publish(app, "raw", {})
            event = await plain.event()
    # CDC rows carry timestamps; a browser gets them as ISO 8601 text.
    expected = SseEvent('{"when":"2024-01-01T00:00:00+00:00"}', id=event_id(app, 1))
    assert event == expected


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("duration('1s')", "timedelta is not JSON serializable"),
        ("double('NaN')", "Out of range float values are not JSON compliant"),
    ],
)
async def test_payload_that_is_not_json_fails_the_event_permanently(
    expression: str, error: str
) -> None:
    raw = f"""
flow "raw" {{
  from {{ connector = "mem"  operation = "raw" }}
  transform {{ value = "{expression}" }}
  to   {{ connector = "sse"  operation = "broadcast" }}
}}
"""
    async with running(config() + raw) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events") as plain:
            await publish(app, "raw", {"n": 1})
            await publish(app, "news", {"after": True})
            event = await plain.event()
        dead = list(app.memory("mem").dead_letters)
    # The failed event took no id: the next one is number 1.
    assert event == SseEvent('{"after":true}', id=event_id(app, 1))
    assert dead == [
        (
            "raw",
            {"n": 1},
            "flow 'raw': to 'sse' failed after 1 try: the payload cannot be sent "
            f"as JSON: {error}",
        )
    ]


async def test_replay_after_last_event_id_merges_stream_and_broadcasts() -> None:
    async with running(config()) as app:
        url = base_url(app)
        await publish(app, "prices", {"p": 1})
        await publish(app, "news", {"b": 2})
        await publish(app, "orders", {"user_id": 1, "o": 3})
        await publish(app, "prices", {"p": 4})
        await publish(app, "news", {"b": 5})
        headers = {"Last-Event-ID": event_id(app, 1)}
        async with open_stream(f"{url}/events/prices", headers) as prices:
            replayed = [await prices.event() for _ in range(3)]
            await publish(app, "prices", {"p": 6})
            live = await prices.event()
    assert [e.id for e in replayed] == [event_id(app, n) for n in (2, 4, 5)]
    assert [e.data for e in replayed] == ['{"b":2}', '{"p":4}', '{"b":5}']
    assert live == SseEvent('{"p":6}', id=event_id(app, 6))


async def test_replay_on_broadcast_path_gives_only_broadcasts() -> None:
    async with running(config()) as app:
        url = base_url(app)
        await publish(app, "news", {"b": 1})
        await publish(app, "prices", {"p": 2})
        await publish(app, "news", {"b": 3})
        headers = {"Last-Event-ID": event_id(app, 1)}
        async with open_stream(f"{url}/events", headers) as plain:
            replayed = await plain.event()
            await publish(app, "news", {"b": 4})
            live = await plain.event()
    assert replayed == SseEvent('{"b":3}', id=event_id(app, 3))
    assert live.id == event_id(app, 4)


async def test_replay_applies_the_filter_of_each_event_to_the_new_client() -> None:
    async with running(config()) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/orders?user_id=1") as first:
            await publish(app, "orders", {"user_id": 1, "n": 1})
            seen = await first.event()
        hub = app.connector("sse").services.hub
        await eventually(lambda: not hub.subscribers)
        await publish(app, "orders", {"user_id": 2, "n": 2})
        await publish(app, "orders", {"user_id": 1, "n": 3})
        headers = {"Last-Event-ID": seen.id or ""}
        async with open_stream(f"{url}/events/orders?user_id=1", headers) as again:
            replayed = await again.event()
            await publish(app, "orders", {"user_id": 1, "n": 4})
            live = await again.event()
        labels = {"flow": "orders", "connector": "sse"}
        deliveries = sample(app, "mycel_subscriber_deliveries_total", **labels)
        dropped = sample(app, "mycel_filter_dropped_total", **labels)
    assert seen.id == event_id(app, 1)
    # Live 1, replayed 3 and live 4 were sent; replayed 2 was filtered out.
    assert (deliveries, dropped) == (3.0, 1.0)
    assert (replayed.id, json.loads(replayed.data)["n"]) == (event_id(app, 3), 3)
    assert (live.id, json.loads(live.data)["n"]) == (event_id(app, 4), 4)


async def test_id_older_than_history_gets_gap_event_then_what_is_kept() -> None:
    async with running(config("history_size = 2")) as app:
        url = base_url(app)
        for n in range(1, 6):
            await publish(app, "prices", {"p": n})
        last = event_id(app, 2)
        async with open_stream(f"{url}/events/prices", {"Last-Event-ID": last}) as s:
            items = [await s.event() for _ in range(3)]
    assert items == [
        SseEvent(json.dumps({"last_event_id": last, "reason": "expired"}), "gap"),
        SseEvent('{"p":4}', id=event_id(app, 4)),
        SseEvent('{"p":5}', id=event_id(app, 5)),
    ]


async def test_id_within_history_gets_no_gap_event() -> None:
    async with running(config("history_size = 2")) as app:
        url = base_url(app)
        for n in range(1, 4):
            await publish(app, "prices", {"p": n})
        last = event_id(app, 1)
        async with open_stream(f"{url}/events/prices", {"Last-Event-ID": last}) as s:
            items = [await s.event() for _ in range(2)]
    assert [e.data for e in items] == ['{"p":2}', '{"p":3}']


async def test_id_of_another_run_gets_unknown_gap_and_the_whole_history() -> None:
    async with running(config()) as app:
        url = base_url(app)
        await publish(app, "prices", {"p": 1})
        old = "0badc0de-41"
        async with open_stream(f"{url}/events/prices", {"Last-Event-ID": old}) as s:
            items = [await s.event() for _ in range(2)]
    assert items == [
        SseEvent(json.dumps({"last_event_id": old, "reason": "unknown"}), "gap"),
        SseEvent('{"p":1}', id=event_id(app, 1)),
    ]


async def test_retry_hint_comes_first() -> None:
    async with running(config('retry = "2s"')) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/prices") as s:
            first_line = await anext(s.response.aiter_lines())
    assert first_line == "retry: 2000"


async def test_idle_connection_gets_heartbeat_comments() -> None:
    async with running(config('heartbeat_interval = "50ms"')) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/prices") as s:
            comments = [await s.comment(), await s.comment()]
    assert comments == ["heartbeat", "heartbeat"]


async def test_shutdown_ends_streams_with_a_closing_comment() -> None:
    async with running(config()) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/prices") as s:
            await app.runtime.stop(timeout=1.0)  # type: ignore[attr-defined]
            rest = await s.rest()
    assert rest == ["closed: server shutting down"]


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        (
            "/events/a%20b",
            400,
            "invalid stream name 'a b'; use 1 to 128 letters, digits, '_', '-' or '.'",
        ),
        (
            "/events/a/b",
            400,
            "invalid stream name 'a/b'; use 1 to 128 letters, digits, '_', '-' or '.'",
        ),
        (
            "/events/prices?x=" + "y" * 2100,
            414,
            "the query string is longer than 2048 bytes",
        ),
    ],
)
async def test_bad_requests_are_refused(path: str, status: int, error: str) -> None:
    async with running(config()) as app, httpx.AsyncClient() as client:
        response = await client.get(base_url(app) + path)
        subscribers = app.connector("sse").services.hub.subscribers
    assert (response.status_code, response.json()) == (status, {"error": error})
    assert subscribers == []


async def test_other_methods_are_refused() -> None:
    async with running(config()) as app, httpx.AsyncClient() as client:
        response = await client.post(base_url(app) + "/events/prices")
    assert response.status_code == 405


async def test_any_valid_stream_is_open_when_a_stream_name_is_templated() -> None:
    async with (
        running(config()) as app,
        open_stream(base_url(app) + "/events/room-anything") as stream,
    ):
        await publish(app, "rooms", {"room": "anything", "text": "hi"})
        event = await stream.event()
    assert event == SseEvent('{"text":"hi"}', id=event_id(app, 1))


async def test_only_named_streams_are_open_without_templates() -> None:
    text = """
connector "mem" { type = "memory" }
connector "sse" {
  type = "sse"
  port = 0
}
flow "prices" {
  from { connector = "mem"  operation = "prices" }
  to   { connector = "sse"  operation = "stream:prices" }
}
"""
    async with running(text) as app, httpx.AsyncClient() as client:
        refused = await client.get(base_url(app) + "/events/room-anything")
    assert (refused.status_code, refused.json()) == (
        404,
        {"error": "no flow publishes to stream 'room-anything'"},
    )


CORS = 'cors {\n origins = ["http://app.example"]\n headers = ["X-Token"]\n}'


async def test_cors_preflight_allows_the_origin_and_last_event_id() -> None:
    async with running(config(CORS)) as app, httpx.AsyncClient() as client:
        response = await client.options(
            base_url(app) + "/events/prices",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://app.example"
    assert response.headers["access-control-allow-methods"] == "GET"
    assert response.headers["access-control-allow-headers"] == (
        "Accept, Accept-Language, Content-Language, Content-Type, Last-Event-ID, "
        "X-Token"
    )
    assert response.headers["access-control-max-age"] == "600"
    assert "Origin" in response.headers["vary"]


async def test_cors_preflight_refuses_other_origins() -> None:
    async with running(config(CORS)) as app, httpx.AsyncClient() as client:
        response = await client.options(
            base_url(app) + "/events/prices",
            headers={
                "Origin": "http://evil.example",
                "Access-Control-Request-Method": "GET",
            },
        )
    assert (response.status_code, response.text) == (400, "Disallowed CORS origin")
    assert "access-control-allow-origin" not in response.headers


async def test_cors_stream_response_names_the_origin_and_varies_on_it() -> None:
    async with running(config(CORS)) as app:
        url = base_url(app) + "/events/prices"
        async with open_stream(url, {"Origin": "http://app.example"}) as s:
            headers = s.response.headers
        # Another origin is refused before the stream (issue 12).
        async with httpx.AsyncClient() as client:
            other = await client.get(url, headers={"Origin": "http://evil.example"})
    assert headers["access-control-allow-origin"] == "http://app.example"
    assert headers["vary"] == "Origin"
    assert (other.status_code, other.json()) == (403, {"error": "origin not allowed"})
    assert "access-control-allow-origin" not in other.headers


async def test_without_cors_no_cors_headers_are_sent() -> None:
    async with running(config()) as app:
        url = base_url(app) + "/events/prices"
        async with open_stream(url, {"Origin": "http://app.example"}) as s:
            headers = s.response.headers
    assert "access-control-allow-origin" not in headers


@pytest.mark.parametrize(("limit", "most"), [("", 9), ("unsent_limit = null", 13)])
async def test_client_that_does_not_read_is_dropped_and_others_get_everything(
    caplog: pytest.LogCaptureFixture, limit: str, most: int
) -> None:
    caplog.set_level(logging.WARNING)
    settings = f'send_queue = 4\n send_timeout = "30s"\n {limit}'
    async with running(config(settings)) as app:
        url = base_url(app)
        hub = app.connector("sse").services.hub

        # A raw socket with a small receive buffer that never reads.
        port = app.connector("sse").port
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(
            b"GET /events/prices HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream"
            b"\r\n\r\n"
        )
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

        async with open_stream(f"{url}/events/prices") as fast:
            assert len(hub.subscribers) == 2
            big = "x" * 100_000
            received = 0
            sent = 0
            # Publish until the hub gave up on the silent client, reading
            # everything on the fast one as it comes.
            while len(hub.subscribers) == 2 and sent < 1000:
                sent += 1
                await publish(app, "prices", {"n": sent, "pad": big})
                event = await fast.event()
                received += 1
                assert json.loads(event.data)["n"] == sent
            assert len(hub.subscribers) == 1
            # What the kernel takes for it before the server's own buffer
            # and send_queue fill: unsent_limit (64 KB) by default, all of
            # send_buffer (256 KB, doubled) without it (8 and 11 of these
            # events here), and with autotuning up to 4 MB.
            assert sent <= most
            await publish(app, "prices", {"n": sent + 1, "pad": ""})
            last = await fast.event()
            drops = sample(app, "mycel_slow_consumers_dropped_total", connector="sse")
            assert drops == 1.0

        # The silent client's connection is closed: reading reaches the end.
        async with asyncio.timeout(10):
            while await reader.read(1 << 20):
                pass
        writer.close()
    assert received == sent
    assert json.loads(last.data)["n"] == sent + 1
    drops = [r for r in caplog.records if r.name == "mycel.sse"]
    assert [(r.levelname, r.getMessage()) for r in drops] == [
        (
            "WARNING",
            "connector 'sse': dropped client 1 of prices: slow consumer: send "
            "queue full (4 messages)",
        )
    ]
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


async def test_client_that_accepts_nothing_for_send_timeout_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    settings = 'send_queue = 10000\n send_timeout = "200ms"'
    async with running(config(settings)) as app:
        url = base_url(app)
        hub = app.connector("sse").services.hub
        port = app.connector("sse").port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events/prices HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

        async with open_stream(f"{url}/events/prices") as fast:
            # Fill the silent client's socket buffers, then keep publishing
            # until its stuck send has waited out send_timeout.
            n = 0
            while len(hub.subscribers) == 2 and n < 2000:
                n += 1
                await publish(app, "prices", {"n": n, "pad": "x" * 50_000})
                assert json.loads((await fast.event()).data)["n"] == n
            assert len(hub.subscribers) == 1
            await publish(app, "prices", {"n": n + 1, "pad": ""})
            assert json.loads((await fast.event()).data)["n"] == n + 1

        async with asyncio.timeout(10):
            while await reader.read(1 << 20):
                pass
        writer.close()
    drops = [r for r in caplog.records if r.name == "mycel.sse"]
    assert [(r.levelname, r.getMessage()) for r in drops] == [
        (
            "WARNING",
            "connector 'sse': dropped client 1 of prices: no data accepted for 0.2s",
        )
    ]
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


async def test_cors_wildcard_allows_any_origin() -> None:
    async with running(config('cors { origins = ["*"] }')) as app:
        url = base_url(app) + "/events/prices"
        async with open_stream(url, {"Origin": "http://any.example"}) as s:
            headers = s.response.headers
    assert headers["access-control-allow-origin"] == "*"


async def test_filter_can_use_the_stream_and_broadcast_path_has_none() -> None:
    alerts = """
flow "alerts" {
  from { connector = "mem"  operation = "alerts" }
  to {
    connector = "sse"
    operation = "broadcast"
    filter    = "context.stream == 'prices' || context.params.all == 'yes'"
  }
}
"""
    async with running(config() + alerts) as app:
        url = base_url(app)
        async with (
            open_stream(f"{url}/events?all=yes") as plain,
            open_stream(f"{url}/events/prices") as prices,
            open_stream(f"{url}/events/room-x") as room,
        ):
            await publish(app, "alerts", {"a": 1})
            await publish(app, "rooms", {"room": "x", "text": "after"})
            got = [await plain.event(), await prices.event(), await room.event()]
    assert [(e.id, e.data) for e in got] == [
        (event_id(app, 1), '{"a":1}'),
        (event_id(app, 1), '{"a":1}'),
        (event_id(app, 2), '{"text":"after"}'),
    ]


async def test_burst_over_send_queue_drops_client_with_a_closing_comment(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(config("send_queue = 4")) as app:
        url = base_url(app)
        async with open_stream(f"{url}/events/prices") as stream:
            # Ten events before the client's writer gets a turn.
            for n in range(10):
                await app.publish("mem", "prices", {"n": n})
            await app.memory("mem").drain()
            rest = await stream.rest()
    assert rest == ["closed: slow consumer: send queue full (4 messages)"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "connector 'sse': dropped client 1 of prices: slow consumer: send "
            "queue full (4 messages)",
        )
    ]
