"""From AMQP messages to events and from payloads to AMQP bodies.

A message body is JSON, UTF-8 encoded; whatever JSON value it holds becomes
the event's ``input`` as it is. The envelope is kept apart from the payload,
under ``context.message``, with header values turned into plain JSON-like
values so that expressions can read them.

"""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aiormq.abc import DeliveredMessage

__all__ = ["decode_body", "encodable", "encode_payload", "envelope", "plain"]


def decode_body(body: bytes) -> Any:
    """The JSON value of a message body; ValueError says why it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"body is not UTF-8 text: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc}") from exc


def _json_default(value: Any) -> Any:
    # Types that database and CDC sources put in payloads.
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return int(value)
        return float(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON serialisable")


def encode_payload(payload: Any) -> bytes:
    """A payload as a compact UTF-8 JSON body.

    Decimals become numbers (integers when integral), date and time values
    ISO 8601 text, UUIDs text, bytes base64 text. TypeError or ValueError
    for anything else (and for NaN, which JSON cannot hold).

    """
    text = json.dumps(
        payload,
        default=_json_default,
        ensure_ascii=False,
        allow_nan=False,
        separators=(",", ":"),
    )
    return text.encode("utf-8")


def plain(value: Any) -> Any:
    """A header value as something CEL can read: text, numbers, lists, maps."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return str(value)


def encodable(value: Any) -> Any:
    """A header value as the AMQP encoder can write it back.

    The decoder gives a long string that is not UTF-8 as ``bytes``, which
    the encoder refuses; as ``bytearray`` it goes out as a byte array, with
    the same bytes.

    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [encodable(item) for item in value]
    return value


def envelope(message: DeliveredMessage, queue: str) -> dict[str, Any]:
    """What ``context.message`` holds for one delivered message."""
    properties = message.header.properties
    timestamp = properties.timestamp
    headers = properties.headers
    return {
        "routing_key": message.routing_key or "",
        "exchange": message.exchange or "",
        "queue": queue,
        "headers": plain(headers) if headers else {},
        "message_id": properties.message_id,
        "correlation_id": properties.correlation_id,
        "content_type": properties.content_type,
        "redelivered": bool(message.redelivered),
        "timestamp": timestamp.isoformat() if timestamp is not None else None,
    }
