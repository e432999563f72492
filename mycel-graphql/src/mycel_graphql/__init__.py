"""GraphQL subscriptions for Mycel (``type = "graphql"``).

A server driver speaking ``graphql-transport-ws`` and the older
``graphql-ws`` subprotocol over the fan-out hub, and a client driver that
subscribes to another GraphQL service. See the distribution's README.

"""

from __future__ import annotations

from ._client import GraphqlClient, subscription_document, websocket_url
from ._connector import GraphqlConnector
from ._protocol import choose_subprotocol, connection_context
from ._server import GraphqlServer
from ._settings import (
    ClientFromOptions,
    GraphqlSettings,
    ReconnectSettings,
    SubscriptionSettings,
)

__all__ = [
    "ClientFromOptions",
    "GraphqlClient",
    "GraphqlConnector",
    "GraphqlServer",
    "GraphqlSettings",
    "ReconnectSettings",
    "SubscriptionSettings",
    "choose_subprotocol",
    "connection_context",
    "subscription_document",
    "websocket_url",
]
