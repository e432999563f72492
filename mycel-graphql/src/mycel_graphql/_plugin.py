"""Entry point of the ``mycel-graphql`` distribution."""

from __future__ import annotations

import mycel

from ._connector import GraphqlConnector


@mycel.hookimpl
def mycel_connector_types() -> list[type[mycel.Connector]]:
    return [GraphqlConnector]
