"""Frames, query parameters and the public names, without a server."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest
from websockets.frames import Frame, Opcode

import mycel_ws
from mycel.testing import free_port, running
from mycel_ws import (
    ClientFrame,
    FrameError,
    connection_context,
    parse_frame,
    query_params,
)
from mycel_ws._frames import encode, message_frame, text_frame
from testsupport.ws import ws_config


def test_all_lists_the_public_names_sorted() -> None:
    public = {
        name
        for name in vars(mycel_ws)
        if not name.startswith("_") and name != "annotations"
    }
    assert sorted(mycel_ws.__all__) == mycel_ws.__all__
    assert set(mycel_ws.__all__) == public


def test_parse_frame_accepts_the_three_client_frames() -> None:
    assert parse_frame('{"type":"join_room","room":"a"}') == ClientFrame(
        "join_room", "a"
    )
    assert parse_frame('{"type":"leave_room","room":"a"}') == ClientFrame(
        "leave_room", "a"
    )
    assert parse_frame('{"type":"message","data":[1]}') == ClientFrame(
        "message", data=[1]
    )
    # A message's data may be any JSON value, null included.
    assert parse_frame('{"type":"message","data":null}') == ClientFrame("message")


def test_parse_frame_shortens_long_values_in_errors() -> None:
    with pytest.raises(FrameError) as info:
        parse_frame('{"type": "' + "x" * 100 + '"}')
    assert str(info.value) == (
        'unknown frame type "'
        + "x" * 56
        + "...; use join_room, leave_room, message or auth"
    )


def test_query_params_keep_the_last_of_repeated_names() -> None:
    assert query_params("/ws?a=1&b=&a=2&c=x%20y") == {"a": "2", "b": "", "c": "x y"}
    assert query_params("/ws") == {}


def test_connection_context_holds_params_and_id() -> None:
    assert connection_context("c1", {"user_id": "7"}) == {
        "params": {"user_id": "7"},
        "id": "c1",
    }


def test_message_frames_encode_values_json_lacks() -> None:
    data = {
        "price": decimal.Decimal("9.50"),
        "count": decimal.Decimal("3"),
        "at": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "day": datetime.date(2024, 1, 2),
        "id": uuid.UUID(int=1),
        "raw": b"\x00\xff",
        "tags": ("a",),
        "text": "é",
    }
    assert (
        message_frame("r", data)
        == (
            '{"type":"message","room":"r","data":{"price":9.5,"count":3,'
            '"at":"2024-01-02T03:04:05+00:00","day":"2024-01-02",'
            '"id":"00000000-0000-0000-0000-000000000001","raw":"AP8=",'
            '"tags":["a"],"text":"é"}}'
        ).encode()
    )
    assert message_frame(None, 1) == b'{"type":"message","data":1}'


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 70_000])
def test_text_frame_is_what_websockets_would_send(size: int) -> None:
    # The three length encodings of RFC 6455, either side of each limit.
    payload = b"y" * size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert text_frame(payload) == expected


def test_encode_names_the_type_it_cannot_send() -> None:
    with pytest.raises(TypeError) as info:
        encode({"x": object()})
    assert str(info.value) == "object values cannot be sent as JSON"


async def test_room_template_that_renders_empty_fails_the_flow() -> None:
    port = free_port()
    flows = """
    flow "to_room" {
      from { connector = "mem"  operation = "in" }
      to   { connector = "ws"   operation = "room:${input.room}" }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        memory = app.memory("mem")
        await app.publish("mem", "in", {"room": ""})
        await memory.drain()
        (topic, payload, error), *_ = memory.dead_letters
        assert (topic, payload) == ("in", {"room": ""})
        assert error == (
            "flow 'to_room': to 'ws' failed after 1 try: operation 'room:': "
            'a room is a non-empty string of at most 200 characters, not ""'
        )


async def test_delivery_to_an_empty_room_succeeds() -> None:
    port = free_port()
    flows = """
    flow "to_room" {
      from { connector = "mem"  operation = "in" }
      to   { connector = "ws"   operation = "room:nobody" }
    }
    """
    async with running(ws_config(port, flows=flows)) as app:
        memory = app.memory("mem")
        await app.publish("mem", "in", {"n": 1})
        await memory.drain()
        assert list(memory.dead_letters) == []
        registry = app.runtime.metrics.registry
        labels = {"flow": "to_room", "connector": "ws"}
        assert registry.get_sample_value("mycel_events_out_total", labels) == 1


def test_the_entry_point_registers_the_websocket_type() -> None:
    from mycel.testing import registry

    assert registry().connector_types["websocket"] is mycel_ws.WebSocketConnector
