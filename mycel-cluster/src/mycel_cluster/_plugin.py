"""Registers the Redis backplane with Mycel."""

from __future__ import annotations

from collections.abc import Sequence

from mycel import Backplane, hookimpl

from ._redis import RedisBackplane


@hookimpl
def mycel_backplanes() -> Sequence[type[Backplane]]:
    return [RedisBackplane]
