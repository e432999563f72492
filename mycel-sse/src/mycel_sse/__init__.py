"""Server-Sent Events connector for Mycel (``type = "sse"``).

Installing this distribution adds the connector type; configurations use it
through ``connector "NAME" { type = "sse" ... }``. See the README for the
settings, the URL shape, event ids and replay.

"""

from __future__ import annotations

from ._connector import SseConnector
from ._history import EventIds, History
from ._settings import CorsSettings, SseSettings, SseToOptions

__all__ = [
    "CorsSettings",
    "EventIds",
    "History",
    "SseConnector",
    "SseSettings",
    "SseToOptions",
]
