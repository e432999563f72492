"""The module the ``mycel`` entry point names: Mycel loads it at start-up."""

from __future__ import annotations

from collections.abc import Sequence

import mycel

from ._connector import RedisConnector


@mycel.hookimpl
def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
    return [RedisConnector]
