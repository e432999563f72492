"""The spec's four WebSocket flows, rooms, filters and source events."""

from __future__ import annotations

from websockets.asyncio.client import connect

from mycel.testing import free_port, running
from testsupport.ws import next_item, receive, ws_config

# Section 4 of the spec, as written; "rabbit" and "db" are memory connectors
# here (the RabbitMQ and database connectors have their own distributions).
SPEC_FLOWS = """
connector "rabbit" { type = "memory" }
connector "db"     { type = "memory" }
flow "broadcast_price" {
  from { connector = "rabbit"  operation = "price.updated" }
  to   { connector = "ws"      operation = "broadcast" }
}
flow "send_to_room" {
  from { connector = "rabbit"  operation = "messages" }
  to   { connector = "ws"      operation = "room:${input.channel_id}" }
}
flow "send_user_notification" {
  from { connector = "rabbit"  operation = "notifications" }
  to {
    connector = "ws"
    operation = "room:notifications"
    filter    = "input.user_id == context.params.user_id"
  }
}
flow "handle_ws_message" {
  from { connector = "ws"  operation = "message" }
  to   { connector = "db"  target = "messages" }
}
"""


async def test_spec_broadcast_price_reaches_every_client() -> None:
    port = free_port()
    async with running(ws_config(port, flows=SPEC_FLOWS)) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url) as one, connect(url + "?user_id=2") as two:
            await app.publish("rabbit", "price.updated", {"sku": "A1", "price": 9.5})
            expected = {"type": "message", "data": {"sku": "A1", "price": 9.5}}
            assert await receive(one) == expected
            assert await receive(two) == expected


async def test_spec_send_to_room_follows_the_channel_template() -> None:
    port = free_port()
    async with running(ws_config(port, flows=SPEC_FLOWS)) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url + "?rooms=7") as seven, connect(url) as other:
            assert await receive(seven) == {"type": "joined", "room": "7"}
            await other.send('{"type":"join_room","room":"8"}')
            assert await receive(other) == {"type": "joined", "room": "8"}

            await app.publish("rabbit", "messages", {"channel_id": 7, "text": "hi"})
            await app.publish("rabbit", "messages", {"channel_id": 8, "text": "yo"})

            assert await receive(seven) == {
                "type": "message",
                "room": "7",
                "data": {"channel_id": 7, "text": "hi"},
            }
            assert await receive(other) == {
                "type": "message",
                "room": "8",
                "data": {"channel_id": 8, "text": "yo"},
            }


async def test_spec_user_notification_reaches_only_that_user() -> None:
    port = free_port()
    async with running(ws_config(port, flows=SPEC_FLOWS)) as app:
        url = f"ws://127.0.0.1:{port}/ws?rooms=notifications&user_id="
        async with connect(url + "123") as alice, connect(url + "456") as bob:
            assert await receive(alice) == {"type": "joined", "room": "notifications"}
            assert await receive(bob) == {"type": "joined", "room": "notifications"}

            # A number in the event matches the text of the query parameter.
            await app.publish("rabbit", "notifications", {"user_id": 123, "n": 1})
            await app.publish("rabbit", "notifications", {"user_id": "456", "n": 2})

            assert await receive(alice) == {
                "type": "message",
                "room": "notifications",
                "data": {"user_id": 123, "n": 1},
            }
            assert await receive(bob) == {
                "type": "message",
                "room": "notifications",
                "data": {"user_id": "456", "n": 2},
            }
            # Each got only its own: the next frame is what we send now.
            await app.publish("rabbit", "notifications", {"user_id": 123, "n": 3})
            await app.publish("rabbit", "notifications", {"user_id": 456, "n": 4})
            assert (await receive(alice))["data"]["n"] == 3
            assert (await receive(bob))["data"]["n"] == 4


async def test_spec_handle_ws_message_delivers_data_to_the_db() -> None:
    port = free_port()
    async with running(ws_config(port, flows=SPEC_FLOWS)) as app:
        stored = app.listen("db", "messages")
        async with connect(f"ws://127.0.0.1:{port}/ws?user_id=5") as client:
            await client.send('{"type":"message","data":{"text":"hello"}}')
            assert await next_item(stored) == ("messages", {"text": "hello"})


async def test_message_source_context_is_the_sending_connection() -> None:
    port = free_port()
    flows = """
    flow "echo" {
      from { connector = "ws"  operation = "message" }
      transform {
        text = "input.text"
        user = "context.params.user"
        has_id = "size(context.id) > 0"
      }
      to { connector = "mem"  target = "out" }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        out = app.listen("mem", "out")
        async with connect(f"ws://127.0.0.1:{port}/ws?user=ann") as client:
            await client.send('{"type":"message","data":{"text":"hi"}}')
            assert await next_item(out) == (
                "out",
                {"text": "hi", "user": "ann", "has_id": True},
            )


async def test_connect_and_disconnect_events_carry_id_params_rooms() -> None:
    port = free_port()
    flows = """
    flow "on_connect" {
      from { connector = "ws"  operation = "connect" }
      to   { connector = "mem" target = "connected" }
    }
    flow "on_disconnect" {
      from { connector = "ws"  operation = "disconnect" }
      to   { connector = "mem" target = "disconnected" }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        connected = app.listen("mem", "connected")
        disconnected = app.listen("mem", "disconnected")
        async with connect(f"ws://127.0.0.1:{port}/ws?u=1&rooms=b,a") as client:
            _, event = await next_item(connected)
            assert event["params"] == {"u": "1", "rooms": "b,a"}
            assert event["rooms"] == ["a", "b"]
            connection_id = event["id"]
            assert len(connection_id) == 36
            await client.close(1000, "bye")
        _, event = await next_item(disconnected)
        assert event == {
            "id": connection_id,
            "params": {"u": "1", "rooms": "b,a"},
            "rooms": [],
            "code": 1000,
            "reason": "bye",
        }


async def test_leave_room_stops_room_messages() -> None:
    port = free_port()
    flows = """
    flow "to_room" {
      from { connector = "mem"  operation = "in" }
      to   { connector = "ws"   operation = "room:${input.room}" }
    }
    """
    async with (
        running(ws_config(port, flows=flows)) as app,
        connect(f"ws://127.0.0.1:{port}/ws?rooms=x,y") as client,
    ):
        assert await receive(client) == {"type": "joined", "room": "x"}
        assert await receive(client) == {"type": "joined", "room": "y"}
        await client.send('{"type":"leave_room","room":"x"}')
        assert await receive(client) == {"type": "left", "room": "x"}
        await app.publish("mem", "in", {"room": "x", "n": 1})
        await app.publish("mem", "in", {"room": "y", "n": 2})
        frame = await receive(client)
        assert frame == {
            "type": "message",
            "room": "y",
            "data": {"room": "y", "n": 2},
        }


async def test_evaluated_filter_runs_per_subscriber() -> None:
    port = free_port()
    flows = """
    flow "f" {
      from { connector = "mem"  operation = "in" }
      transform { level = "input.level" }
      to {
        connector = "ws"
        operation = "broadcast"
        filter    = "has(input.marker) || output.level >= int(context.params.min)"
      }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        url = f"ws://127.0.0.1:{port}/ws"
        async with (
            connect(url + "?min=5") as high,
            connect(url + "?min=1") as low,
            connect(url) as no_param,
        ):
            for event in ({"level": 3}, {"level": 7}, {"marker": 1, "level": 0}):
                await app.publish("mem", "in", event)
            assert await receive(low) == {"type": "message", "data": {"level": 3}}
            assert await receive(low) == {"type": "message", "data": {"level": 7}}
            assert await receive(high) == {"type": "message", "data": {"level": 7}}
            # Without the parameter the filter fails and counts as false,
            # so the first frame no_param gets is the marker.
            marker = {"type": "message", "data": {"level": 0}}
            assert await receive(no_param) == marker
            assert await receive(high) == marker
            errors = app.runtime.metrics.filter_errors.labels("f", "ws")
            assert errors._value.get() == 2


async def test_timestamps_are_sent_as_iso_text() -> None:
    port = free_port()
    flows = """
    flow "f" {
      from { connector = "mem"  operation = "in" }
      transform { when = "timestamp('2024-01-02T03:04:05Z')" }
      to { connector = "ws"  operation = "broadcast" }
    }
    """
    async with (
        running(ws_config(port, flows=flows)) as app,
        connect(f"ws://127.0.0.1:{port}/ws") as client,
    ):
        await app.publish("mem", "in", {})
        frame = await receive(client)
        assert frame["type"] == "message"
        assert frame["data"]["when"].startswith("2024-01-02T03:04:05")


async def test_a_burst_of_events_arrives_complete_and_in_order() -> None:
    port = free_port()
    flows = """
    flow "out" {
      from { connector = "mem"  operation = "in" }
      to   { connector = "ws"   operation = "room:r" }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        url = f"ws://127.0.0.1:{port}/ws?rooms=r"
        async with connect(url) as one, connect(url) as two:
            for client in (one, two):
                assert await receive(client) == {"type": "joined", "room": "r"}
            # Queued without yielding: the flow handles them in one go, and
            # each client's frames are written together.
            for n in range(200):
                await app.publish("mem", "in", {"n": n})
            for client in (one, two):
                got = [(await receive(client))["data"]["n"] for _ in range(200)]
                assert got == list(range(200))


async def test_chat_echo_reaches_the_room_but_not_the_sender() -> None:
    port = free_port()
    flows = """
    flow "chat" {
      from { connector = "ws"  operation = "message" }
      transform {
        text   = "input.text"
        sender = "context.id"
        name   = "context.params.name"
      }
      to {
        connector = "ws"
        operation = "room:${input.room}"
        filter    = "output.sender != context.id"
      }
    }
    """
    async with running(ws_config(port, flows=flows)):
        url = f"ws://127.0.0.1:{port}/ws?rooms=lobby&name="
        async with connect(url + "ann") as ann, connect(url + "bob") as bob:
            for client in (ann, bob):
                assert await receive(client) == {"type": "joined", "room": "lobby"}
            await ann.send('{"type":"message","data":{"room":"lobby","text":"hi"}}')
            frame = await receive(bob)
            assert frame["room"] == "lobby"
            assert frame["data"]["text"] == "hi"
            assert frame["data"]["name"] == "ann"
            # ann's own message was filtered out: her next frame is bob's.
            await bob.send('{"type":"message","data":{"room":"lobby","text":"yo"}}')
            frame = await receive(ann)
            assert (frame["data"]["name"], frame["data"]["text"]) == ("bob", "yo")
