"""The settings of ``type = "redis"`` and of its ``from`` and ``to`` blocks."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, field_validator

import mycel

__all__ = ["RedisFromOptions", "RedisSettings", "RedisToOptions"]


class RedisSettings(mycel.Settings):
    """Settings of ``type = "redis"``."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, or
    ``rediss://`` for TLS. The password is never shown."""

    field: str = Field(default="data", min_length=1)
    """The stream entry field that holds the JSON payload, for ``xadd``
    and for ``stream:`` sources."""

    consumer: str = Field(default_factory=socket.gethostname, min_length=1)
    """This process's consumer name in stream consumer groups. Keep it
    stable across restarts (the default is the host name) so that a
    restarted process finds the entries it had read but not acknowledged;
    give each process reading the same group its own name."""

    client_name: str | None = Field(default=None, min_length=1)
    """Name of the connections in ``CLIENT LIST`` (no spaces); by default
    ``mycel:`` followed by the connector's name."""

    timeout: mycel.Duration = Field(default=5.0, gt=0)
    """How long connecting, or a command, may take before the connection
    counts as lost. Blocking stream reads wait for half of it at most."""

    @field_validator("client_name")
    @classmethod
    def _no_spaces(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 1:
            raise ValueError(
                f"{value!r} has spaces, which Redis refuses in client names; "
                "write it without"
            )
        return value

    batch: int = Field(default=100, ge=1)
    """Stream entries read per ``XREADGROUP`` call."""

    claim_idle: mycel.Duration = Field(default=60.0, gt=0)
    """Stream entries that another consumer of the group read but did not
    acknowledge for this long are claimed (``XAUTOCLAIM``) and processed
    here; checked at start-up and then at this interval."""

    reconnect_delay: mycel.Duration = Field(default=0.5, gt=0)
    """First wait before reading again after losing the connection;
    doubles on each failure up to 30 seconds."""


class RedisFromOptions(mycel.Settings):
    """Extra attributes of a ``from`` block that reads a ``stream:``."""

    group: str | None = Field(default=None, min_length=1)
    """Consumer group; by default the flow's name, so that every flow that
    reads a stream receives every entry."""

    start: Literal["new", "beginning"] = "new"
    """Where a consumer group that does not exist yet starts: ``new``
    entries only (``$``), or the ``beginning`` of the stream (``0``)."""


class RedisToOptions(mycel.Settings):
    """Extra attributes of a ``to`` block with ``operation = "xadd"``."""

    maxlen: int | None = Field(default=None, ge=1)
    """Trim the stream to about this many entries on each ``XADD``."""

    approximate: bool = True
    """Trim with ``MAXLEN ~`` (cheap, may keep a few more entries);
    ``false`` trims to exactly ``maxlen``."""
