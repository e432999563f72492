"""Registers the ``elasticsearch`` connector type with Mycel."""

from __future__ import annotations

from collections.abc import Sequence

import mycel

from ._connector import ElasticsearchConnector


@mycel.hookimpl
def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
    return [ElasticsearchConnector]
