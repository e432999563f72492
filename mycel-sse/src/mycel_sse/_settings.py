"""Settings of ``type = "sse"`` and of its ``to`` blocks."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from mycel import AuthSettings, Duration, Settings

__all__ = [
    "GAP_EVENT",
    "STREAM_NAME",
    "CorsSettings",
    "SseSettings",
    "SseToOptions",
]

STREAM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
"""What a stream name may be: in a URL path and in ``stream:NAME``."""

GAP_EVENT = "gap"
"""The event name of the signal that replay cannot fill a gap."""

_PATH = re.compile(r"(/[A-Za-z0-9_.\-~]+)+")
_EVENT_NAME = re.compile(r"[^\r\n:]{1,64}")


class CorsSettings(Settings):
    """Cross-origin access for browsers (``cors { ... }`` block)."""

    origins: list[str] = Field(min_length=1)
    """Origins allowed to open streams, e.g. ``["https://app.example"]``;
    ``["*"]`` allows any origin (and then credentials cannot be used)."""

    credentials: bool = False
    """Allow cookies (``new EventSource(url, {withCredentials: true})``)."""

    headers: list[str] = []
    """Request headers allowed besides ``Last-Event-ID``, which always is."""

    max_age: Duration = 600.0
    """How long a browser may cache a preflight answer."""

    @field_validator("origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"{origin!r} is not an origin; write it like "
                    '"https://app.example" or "http://localhost:3000" (no path)'
                )
        return origins

    @model_validator(mode="after")
    def _check_wildcard(self) -> CorsSettings:
        if self.credentials and "*" in self.origins:
            raise ValueError(
                'credentials cannot be allowed for origins = ["*"]; list the '
                "origins instead"
            )
        return self


class SseSettings(Settings):
    """Settings of ``type = "sse"``."""

    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = Field(default=8080, ge=0, le=65535)
    """Port to listen on (0: any free port)."""

    path: str = "/events"
    """URL path of the broadcast-only stream; streams are ``PATH/NAME``."""

    heartbeat_interval: Duration = Field(default=15.0, gt=0)
    """How often an idle connection gets a ``: heartbeat`` comment."""

    retry: Duration | None = Field(default=None, gt=0)
    """Reconnection delay hint sent to each client (``retry:`` field); by
    default clients use their own (about 3 seconds in browsers)."""

    history_size: int = Field(default=100, ge=0)
    """Events kept per stream (and for broadcasts) for ``Last-Event-ID``
    replay; 0 disables replay."""

    history_ttl: Duration | None = Field(default=None, gt=0)
    """How long an event stays replayable; by default until pushed out by
    ``history_size`` newer events."""

    send_queue: int = Field(default=1000, ge=1)
    """Events queued for one client; a client that falls this far behind
    is disconnected so that it cannot slow the others."""

    send_buffer: int | None = Field(default=262_144, ge=4096)
    """The kernel's send buffer of each connection (``SO_SNDBUF``), bytes;
    null leaves it to the kernel's autotuning.

    It bounds what may be on the network, sent and not yet acknowledged,
    for one client; ``unsent_limit`` bounds what of it may wait unsent.
    Autotuning lets it grow to ``net.ipv4.tcp_wmem``'s maximum (4 MB on
    most Linux systems).
    """

    unsent_limit: int | None = Field(default=65_536, ge=4096)
    """Bytes of a connection's ``send_buffer`` that may wait there unsent
    (``TCP_NOTSENT_LOWAT``; Linux and macOS, ignored elsewhere); null: all
    of it.

    A client that stops reading is found out once this much waits in the
    kernel for it, the server's own write buffer is full and then
    ``send_queue`` fills (or ``send_timeout`` passes). Without the limit
    the server would first copy a whole ``send_buffer`` into the kernel
    for it, which, for many such clients at once, holds up everyone else.
    Bytes in flight do not count, so a client far away still gets
    ``send_buffer`` on the network.
    """

    send_timeout: Duration = Field(default=10.0, gt=0)
    """A client that accepts no data for this long is disconnected (checked
    every second, or every quarter of this if shorter)."""

    max_query_length: int = Field(default=2048, ge=0)
    """Longest query string accepted, in bytes; longer ones get 414."""

    cors: CorsSettings | None = None
    """Cross-origin access; without it no CORS headers are sent. With it, a
    request whose ``Origin`` is not among ``cors.origins`` gets HTTP 403."""

    auth: AuthSettings | None = None
    """The ``auth { ... }`` block: verify a JWT when a stream opens; its
    claims become ``context.user``. Without it, nothing about a client is
    proven."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not _PATH.fullmatch(path):
            raise ValueError(
                f'{path!r} is not a usable path; write it like "/events" '
                "(starts with /, no trailing /, letters, digits, _ - . ~)"
            )
        return path


class SseToOptions(Settings):
    """Extra attributes of a ``to`` block naming an ``sse`` connector."""

    event: str | None = None
    """The SSE event name (``event:`` field), for
    ``source.addEventListener(NAME, ...)``; without it clients get the
    event in ``onmessage``."""

    @field_validator("event")
    @classmethod
    def _check_event(cls, event: str | None) -> str | None:
        if event is None:
            return None
        if not _EVENT_NAME.fullmatch(event):
            raise ValueError(
                f"{event!r} is not a usable event name; use 1 to 64 "
                "characters without line breaks or ':'"
            )
        if event == GAP_EVENT:
            raise ValueError(
                f"event name {event!r} is reserved for the replay gap signal; "
                "choose another name"
            )
        return event
