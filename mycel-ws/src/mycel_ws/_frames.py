"""The JSON frames clients and the server exchange.

Client to server::

    {"type": "join_room", "room": "R"}
    {"type": "leave_room", "room": "R"}
    {"type": "message", "data": ...}
    {"type": "auth", "token": "JWT"}      (a fresh token, with ``auth``)

Server to client::

    {"type": "message", "room": "R", "data": ...}   ("room" only for rooms)
    {"type": "joined", "room": "R"}
    {"type": "left", "room": "R"}
    {"type": "authenticated", "expires_at": 1767225600}
    {"type": "error", "message": "..."}

"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_ROOM_LENGTH",
    "ClientFrame",
    "FrameError",
    "authenticated_frame",
    "encode",
    "error_frame",
    "message_frame",
    "parse_frame",
    "room_frame",
    "text_frame",
]

MAX_ROOM_LENGTH = 200
"""Longest room name, in characters."""

_TYPES = ("join_room", "leave_room", "message", "auth")


class FrameError(ValueError):
    """A client frame that cannot be used; the text goes to the client."""


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """A checked client frame: ``room`` for joins and leaves, else ``data``
    (the token of an ``auth`` frame)."""

    type: str
    room: str = ""
    data: Any = None


def check_room(room: Any) -> str:
    """``room`` if it is a usable room name; raise FrameError otherwise."""
    if not isinstance(room, str) or not room or len(room) > MAX_ROOM_LENGTH:
        raise FrameError(
            f"a room is a non-empty string of at most {MAX_ROOM_LENGTH} "
            f"characters, not {_shown(room)}"
        )
    return room


def parse_frame(raw: str | bytes) -> ClientFrame:
    """Check one frame a client sent; raise FrameError saying what is wrong."""
    if isinstance(raw, bytes):
        raise FrameError("binary frames are not accepted; send JSON as text")
    try:
        frame = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FrameError(f"the frame is not valid JSON: {exc}") from exc
    if not isinstance(frame, dict) or "type" not in frame:
        raise FrameError('a frame must be a JSON object with a "type"')
    kind = frame["type"]
    if kind not in _TYPES:
        raise FrameError(
            f"unknown frame type {_shown(kind)}; "
            "use join_room, leave_room, message or auth"
        )
    if kind == "message":
        if "data" not in frame:
            raise FrameError('a message frame needs "data"')
        return ClientFrame(kind, data=frame["data"])
    if kind == "auth":
        token = frame.get("token")
        if not isinstance(token, str) or not token.strip():
            raise FrameError('an auth frame needs "token", a non-empty string')
        return ClientFrame(kind, data=token.strip())
    if "room" not in frame:
        raise FrameError(f'a {kind} frame needs "room"')
    return ClientFrame(kind, room=check_room(frame["room"]))


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _default(value: Any) -> Any:
    # Values that CDC rows and transforms carry but JSON has no type for.
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} values cannot be sent as JSON")


def encode(frame: dict[str, Any]) -> bytes:
    """UTF-8 JSON of a server frame; TypeError for values JSON cannot hold."""
    return json.dumps(
        frame, default=_default, ensure_ascii=False, separators=(",", ":")
    ).encode()


def message_frame(room: str | None, data: Any) -> bytes:
    """A ``message`` frame; ``room`` is left out for broadcasts."""
    if room is None:
        return encode({"type": "message", "data": data})
    return encode({"type": "message", "room": room, "data": data})


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one WebSocket text frame, the way a server sends it.

    Unfragmented and unmasked (RFC 6455, section 5.2), with no extension:
    the bytes websockets would write for ``send_text(payload)`` on a
    connection without compression, built once for every client.
    """
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x81, length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x81, 126, length)
    else:
        head = struct.pack("!BBQ", 0x81, 127, length)
    return head + payload


def room_frame(kind: str, room: str) -> bytes:
    """A ``joined`` or ``left`` confirmation."""
    return encode({"type": kind, "room": room})


def authenticated_frame(expires_at: float | None) -> bytes:
    """The answer to an accepted ``auth`` frame: when the server will close."""
    if expires_at is not None and expires_at.is_integer():
        return encode({"type": "authenticated", "expires_at": int(expires_at)})
    return encode({"type": "authenticated", "expires_at": expires_at})


def error_frame(message: str) -> bytes:
    return encode({"type": "error", "message": message})
