"""Registers the ``sse`` connector type with Mycel (entry point ``mycel``)."""

from __future__ import annotations

import mycel

from ._connector import SseConnector

__all__ = ["mycel_connector_types"]


@mycel.hookimpl
def mycel_connector_types() -> list[type[mycel.Connector]]:
    return [SseConnector]
