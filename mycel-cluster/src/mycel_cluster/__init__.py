"""Redis backplane for Mycel clusters; see README.md."""

from __future__ import annotations

from ._redis import RedisBackplane

__all__ = ["RedisBackplane"]
