"""mycel-redis: Redis pub/sub and streams for Mycel (``type = "redis"``).

Written from the plugin template and the plugin guide only, as a third
party writes a plugin. See README.md for settings, operations, event shapes
and delivery guarantees.

"""

from __future__ import annotations

from ._connector import RedisConnector
from ._settings import RedisFromOptions, RedisSettings, RedisToOptions
from ._streams import DEAD_SUFFIX

__all__ = [
    "DEAD_SUFFIX",
    "RedisConnector",
    "RedisFromOptions",
    "RedisSettings",
    "RedisToOptions",
]
