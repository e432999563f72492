"""Registers the ``rabbitmq`` connector type with Mycel."""

from __future__ import annotations

from collections.abc import Sequence

from mycel import Connector, hookimpl

from ._connector import RabbitConnector


@hookimpl
def mycel_connector_types() -> Sequence[type[Connector]]:
    return [RabbitConnector]
