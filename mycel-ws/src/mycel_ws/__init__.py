"""Mycel's WebSocket connector: ``type = "websocket"``.

See the distribution's README for the settings, frames, operations and
close codes.

"""

from __future__ import annotations

from ._connector import WebSocketConnector
from ._context import connection_context, query_params
from ._frames import ClientFrame, FrameError, parse_frame
from ._settings import WebSocketSettings

__all__ = [
    "ClientFrame",
    "FrameError",
    "WebSocketConnector",
    "WebSocketSettings",
    "connection_context",
    "parse_frame",
    "query_params",
]
