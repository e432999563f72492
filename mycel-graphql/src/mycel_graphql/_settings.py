"""Settings of ``type = "graphql"``, for both drivers.

One model serves the ``server`` driver (the default) and the ``client``
driver. A setting that only the other driver understands is reported on its
own line, naming the driver that takes it, rather than being ignored.

"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

import mycel

__all__ = [
    "ClientFromOptions",
    "GraphqlSettings",
    "ReconnectSettings",
    "SubscriptionSettings",
]

Driver = Literal["server", "client"]

_SERVER_ONLY = (
    "host",
    "port",
    "path",
    "schema_file",
    "playground",
    "queue_size",
    "send_buffer",
    "unsent_limit",
    "allowed_origins",
    "auth",
)
_CLIENT_ONLY = ("endpoint", "headers", "connection_params", "reconnect")
_SUBSCRIPTIONS_SERVER_ONLY = ("transport", "keepalive", "connection_init_timeout")
_SUBSCRIPTIONS_CLIENT_ONLY = ("protocol",)


class SubscriptionSettings(mycel.Settings):
    """The ``subscriptions { ... }`` block."""

    enabled: bool = True
    """Whether subscriptions are served (server) or made (client)."""

    transport: Literal["websocket"] = "websocket"
    """Server: how subscriptions travel; only ``"websocket"`` is offered."""

    path: str | None = None
    """Server: the WebSocket path (default: ``path``). Client: the path of
    the subscription endpoint on the ``endpoint`` host (default: the
    endpoint's own path)."""

    keepalive: mycel.Duration = Field(default=12.0, ge=0)
    """Server: interval of keep-alive messages (``ping`` in
    graphql-transport-ws, ``ka`` in graphql-ws); 0 sends none."""

    connection_init_timeout: mycel.Duration = Field(default=3.0, gt=0)
    """Server: how long a client may wait before ``connection_init``; the
    connection is then closed with 4408."""

    protocol: Literal["auto", "graphql-transport-ws", "graphql-ws"] = "auto"
    """Client: the WebSocket subprotocol to ask for; ``auto`` offers both
    and lets the server choose."""


class ReconnectSettings(mycel.Settings):
    """Client: the ``reconnect { ... }`` block."""

    initial_delay: mycel.Duration = Field(default=0.5, gt=0)
    """Wait before the first reconnection attempt; doubles per attempt."""

    max_delay: mycel.Duration = Field(default=30.0, gt=0)
    """Longest wait between two attempts."""

    healthy_after: mycel.Duration = Field(default=30.0, ge=0)
    """A connection that lasted this long resets the backoff."""


class GraphqlSettings(mycel.Settings):
    """Settings of ``type = "graphql"``; see the README for both drivers."""

    driver: Driver = "server"
    """``"server"`` serves subscriptions; ``"client"`` subscribes to
    another GraphQL service."""

    host: str = "127.0.0.1"
    """Server: address to listen on."""

    port: int = Field(default=4000, ge=0, le=65535)
    """Server: port to listen on (0: any free port)."""

    path: str = "/graphql"
    """Server: path of the HTTP endpoint (queries, introspection, IDE)."""

    schema_file: str | None = Field(default=None, alias="schema")
    """Server: an SDL file (relative to the configuration) declaring the
    types of the subscription fields. Without it every field is ``JSON``."""

    playground: bool = True
    """Server: serve the GraphiQL IDE on GET ``path`` from a browser."""

    queue_size: int = Field(default=1000, ge=1)
    """Server: messages queued per subscription before it is dropped as a
    slow consumer."""

    send_buffer: int | None = Field(default=262_144, ge=4096)
    """Server: the kernel's send buffer of each connection (``SO_SNDBUF``),
    bytes, sent and not yet acknowledged included; null leaves it to the
    kernel's autotuning (up to 4 MB)."""

    unsent_limit: int | None = Field(default=65_536, ge=4096)
    """Server: bytes of a connection's ``send_buffer`` that may wait there
    unsent (``TCP_NOTSENT_LOWAT``; Linux and macOS, ignored elsewhere);
    null: all of it. A client that stops reading is found out once this,
    the server's write buffer and ``queue_size`` are full; without the
    limit the server first copies a whole ``send_buffer`` into the kernel
    for it."""

    subscriptions: SubscriptionSettings = SubscriptionSettings()
    """The ``subscriptions { ... }`` block."""

    allowed_origins: list[str] | None = None
    """Server: ``Origin`` values browsers may open subscriptions from
    (``"*"``: any, ``"https://*.example.com"``: any subdomain); null: any.
    Others get HTTP 403 before the upgrade. Handshakes without ``Origin``
    (clients that are not browsers) are always allowed."""

    auth: mycel.AuthSettings | None = None
    """Server: the ``auth { ... }`` block: verify a JWT per connection (from
    the handshake or the ``connection_init`` payload); its claims become
    ``context.user``. Without it, nothing about a client is proven."""

    endpoint: str | None = Field(default=None, validate_default=True)
    """Client: URL of the other service's GraphQL endpoint (http, https,
    ws or wss)."""

    headers: dict[str, str] = {}
    """Client: HTTP headers sent with the WebSocket handshake."""

    connection_params: dict[str, Any] = {}
    """Client: the ``connection_init`` payload."""

    reconnect: ReconnectSettings = ReconnectSettings()
    """Client: the ``reconnect { ... }`` block (backoff policy)."""

    @field_validator(*_SERVER_ONLY, mode="after")
    @classmethod
    def _server_only(cls, value: Any, info: ValidationInfo) -> Any:
        _check_driver(info, "server")
        return value

    @field_validator("headers", "connection_params", "reconnect", mode="after")
    @classmethod
    def _client_only(cls, value: Any, info: ValidationInfo) -> Any:
        _check_driver(info, "client")
        return value

    @field_validator("endpoint", mode="after")
    @classmethod
    def _endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        driver = info.data.get("driver", "server")
        if value is None:
            if driver == "client":
                raise ValueError(
                    "the client driver needs an endpoint, e.g. endpoint = "
                    '"http://other-service:4000/graphql"'
                )
            return None
        _check_driver(info, "client")
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("the endpoint must start with http, https, ws or wss")
        return value

    @field_validator("subscriptions", mode="after")
    @classmethod
    def _subscriptions(
        cls, value: SubscriptionSettings, info: ValidationInfo
    ) -> SubscriptionSettings:
        driver = info.data.get("driver", "server")
        other = (
            _SUBSCRIPTIONS_SERVER_ONLY
            if driver == "client"
            else _SUBSCRIPTIONS_CLIENT_ONLY
        )
        wrong = sorted(value.model_fields_set & set(other))
        if wrong:
            taker = "server" if driver == "client" else "client"
            raise ValueError(
                f"{', '.join(wrong)} is a setting of the {taker} driver, and "
                f"this connector has driver = {driver!r}"
            )
        return value

    @property
    def ws_path(self) -> str:
        """Server: the path WebSocket subscriptions are served on."""
        return self.subscriptions.path or self.path


def _check_driver(info: ValidationInfo, wanted: Driver) -> None:
    driver = info.data.get("driver", "server")
    if driver != wanted:
        raise ValueError(
            f"only the {wanted} driver takes this setting, and this connector "
            f"has driver = {driver!r}"
        )


class ClientFromOptions(mycel.Settings):
    """Extra attributes of a ``from`` block naming a client connector."""

    query: str | None = None
    """The full subscription document; without it the connector sends
    ``subscription { NAME }``, which suits scalar and JSON fields only."""

    variables: dict[str, Any] = {}
    """Variables sent with the subscription."""
