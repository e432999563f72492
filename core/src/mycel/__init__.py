"""Mycel: a declarative runtime for real-time and event-driven delivery.

The public API for plugin authors and embedders. Everything a plugin needs
is importable from here; modules whose names start with ``_`` are private.

"""

from __future__ import annotations

from ._asgi import AsgiServer, limit_sending
from ._auth import (
    ANONYMOUS,
    CLOSE_TOKEN_EXPIRED,
    GRAPHQL_WS_UNAUTHORIZED,
    SSE_EXPIRED_EVENT,
    Authenticator,
    AuthError,
    AuthSettings,
    ExpiryTimer,
    Identity,
    JoinPolicy,
    JwtSettings,
    build_context,
    check_origin,
)
from ._backoff import Backoff
from ._cluster import Backplane, ClusteredHub, ClusterSettings, ToBlock
from ._cluster import decode as backplane_decode
from ._cluster import encode as backplane_encode
from ._config import Config, load_config, load_config_text
from ._connector import (
    Connector,
    Delivery,
    Event,
    Filter,
    Operation,
    Services,
    SourceBinding,
)
from ._engine import FlowHandle
from ._expr import Expression, Template, as_text
from ._hub import Hub, Message, Subscriber, SubscriberClosed, WriteBatch
from ._memory import MemoryConnector, TopicPattern
from ._plugins import PluginRegistry, load_plugins
from ._runtime import Runtime
from ._settings import Duration, Settings, redact_url
from .errors import (
    ConfigError,
    ConnectorError,
    DeliveryError,
    ExpressionError,
    FlowError,
    MycelError,
    PluginError,
    Problem,
)
from .hookspecs import hookimpl

__all__ = [
    "ANONYMOUS",
    "AsgiServer",
    "AuthError",
    "AuthSettings",
    "Authenticator",
    "Backoff",
    "Backplane",
    "CLOSE_TOKEN_EXPIRED",
    "ClusterSettings",
    "ClusteredHub",
    "Config",
    "ConfigError",
    "Connector",
    "ConnectorError",
    "Delivery",
    "DeliveryError",
    "Duration",
    "Event",
    "ExpiryTimer",
    "Expression",
    "ExpressionError",
    "Filter",
    "FlowError",
    "FlowHandle",
    "GRAPHQL_WS_UNAUTHORIZED",
    "Hub",
    "Identity",
    "JoinPolicy",
    "JwtSettings",
    "MemoryConnector",
    "Message",
    "MycelError",
    "Operation",
    "PluginError",
    "PluginRegistry",
    "Problem",
    "Runtime",
    "SSE_EXPIRED_EVENT",
    "Services",
    "Settings",
    "SourceBinding",
    "Subscriber",
    "SubscriberClosed",
    "Template",
    "ToBlock",
    "TopicPattern",
    "WriteBatch",
    "as_text",
    "backplane_decode",
    "backplane_encode",
    "build_context",
    "check_origin",
    "hookimpl",
    "limit_sending",
    "load_config",
    "load_config_text",
    "load_plugins",
    "redact_url",
]

__version__ = "0.1.0"
