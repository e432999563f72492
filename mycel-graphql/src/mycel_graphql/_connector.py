"""The ``graphql`` connector type: one class, two drivers.

``driver = "server"`` (the default) serves the subscription fields that the
flows publish to (``to { operation = "Subscription.NAME" }``) over
WebSocket, filtering per subscriber through the fan-out hub.
``driver = "client"`` subscribes to another GraphQL service and runs a flow
for every event (``from { operation = "Subscription.NAME" }``).

"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import mycel

from ._client import GraphqlClient, subscription_document
from ._server import GraphqlServer
from ._settings import ClientFromOptions, GraphqlSettings

__all__ = ["GraphqlConnector"]

_SUBSCRIPTION = mycel.Operation(
    "Subscription.NAME",
    "a subscription field, e.g. Subscription.orderUpdated",
    r"Subscription\.[_A-Za-z][_0-9A-Za-z]*",
)


class GraphqlConnector(mycel.Connector):
    """GraphQL subscriptions; see the module docstring and the README."""

    type_name = "graphql"
    settings_model = GraphqlSettings
    source_operations = (_SUBSCRIPTION,)
    target_operations = (_SUBSCRIPTION,)
    from_options = ClientFromOptions
    fan_out = True
    ordered = True

    server: GraphqlServer | None
    client: GraphqlClient | None

    _ROLES: ClassVar[dict[str, str]] = {"source": "client", "target": "server"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, GraphqlSettings)
        self._settings: GraphqlSettings = self.settings
        self.server = None
        self.client = None
        if self._settings.driver == "server":
            self.server = GraphqlServer(self.name, self._settings, self.services)
        else:
            self.client = GraphqlClient(self.name, self._settings, self.services)

    @classmethod
    def check_binding(
        cls,
        settings: mycel.Settings,
        role: Literal["source", "target"],
        operation: str,
        options: mycel.Settings | None,
    ) -> list[str]:
        assert isinstance(settings, GraphqlSettings)
        wanted = cls._ROLES[role]
        if settings.driver != wanted:
            verb = "read from" if role == "source" else "publish to"
            return [
                f"a flow can only {verb} a graphql connector with driver = "
                f"{wanted!r}, and this one has driver = {settings.driver!r}"
            ]
        if not settings.subscriptions.enabled:
            return [
                "subscriptions are disabled on this connector (subscriptions.enabled)"
            ]
        if "${" in operation:
            return [f"the subscription field cannot be a template: {operation!r}"]
        if role == "source" and isinstance(options, ClientFromOptions):
            field = operation.removeprefix("Subscription.")
            try:
                subscription_document(field, options.query)
            except ValueError as exc:
                return [str(exc)]
        return []

    @property
    def port(self) -> int:
        """Server: the port actually listened on (useful with ``port = 0``)."""
        assert self.server is not None, "the client driver listens on no port"
        return self.server.port

    def bind_target(self, operation: str, options: mycel.Settings | None) -> None:
        if self.server is not None:
            self.server.bind_target(operation)

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()

    async def start_sources(self) -> None:
        if self.client is not None:
            await self.client.start_sources(self.bindings)

    async def stop_sources(self) -> None:
        if self.client is not None:
            await self.client.stop_sources()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def deliver(self, delivery: mycel.Delivery) -> None:
        if self.server is None:
            raise mycel.DeliveryError(
                f"connector {self.name!r} is a GraphQL client and cannot be a target",
                permanent=True,
            )
        await self.server.deliver(delivery)
