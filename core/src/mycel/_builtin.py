"""The plugin of core itself: the ``memory`` and ``http`` connectors."""

from __future__ import annotations

from collections.abc import Sequence

from ._connector import Connector
from ._http import HttpConnector
from ._memory import MemoryConnector
from .hookspecs import hookimpl


@hookimpl
def mycel_connector_types() -> Sequence[type[Connector]]:
    return [MemoryConnector, HttpConnector]
