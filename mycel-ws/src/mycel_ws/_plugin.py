"""Registers the ``websocket`` connector type with Mycel."""

from __future__ import annotations

from collections.abc import Sequence

import mycel

from ._connector import WebSocketConnector


@mycel.hookimpl
def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
    return [WebSocketConnector]
