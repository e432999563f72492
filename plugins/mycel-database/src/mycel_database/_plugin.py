"""Registers the ``database`` connector type with Mycel."""

from __future__ import annotations

from collections.abc import Sequence

import mycel

from ._connector import DatabaseConnector


@mycel.hookimpl
def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
    return [DatabaseConnector]
