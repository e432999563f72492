"""The settings of ``type = "websocket"``."""

from __future__ import annotations

from pydantic import Field, field_validator

from mycel import AuthSettings, Duration, Settings

__all__ = ["WebSocketSettings"]


class WebSocketSettings(Settings):
    """Settings of ``type = "websocket"``."""

    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = Field(default=8765, ge=0, le=65535)
    """Port to listen on (0: any free port)."""

    path: str = "/ws"
    """URL path of the endpoint; handshakes for other paths get HTTP 404."""

    ping_interval: Duration | None = 20.0
    """How often the server pings each client; null turns pings off."""

    ping_timeout: Duration | None = 20.0
    """How long a ping may go unanswered before the client is closed (1011)."""

    close_timeout: Duration = 5.0
    """How long a closing handshake may take before the socket is dropped."""

    max_message_size: int = Field(default=1_048_576, ge=1)
    """Largest frame a client may send, in bytes; larger ones close with 1009."""

    send_queue: int = Field(default=1000, ge=1)
    """Messages that may wait for one client once its socket buffer is full.

    A client whose queue overflows is closed with 1008 "slow consumer".
    """

    send_buffer: int | None = Field(default=262_144, ge=4096)
    """The kernel's send buffer of each connection (``SO_SNDBUF``), bytes;
    null leaves it to the kernel's autotuning.

    It bounds what may be on the network, sent and not yet acknowledged,
    for one client; ``unsent_limit`` bounds what of it may wait unsent.
    Autotuning lets the buffer grow to ``net.ipv4.tcp_wmem``'s maximum
    (4 MB on most Linux systems); the default still sends 256 KB ahead per
    client, ample for real-time messages unless a client is far away and
    the messages are large.
    """

    unsent_limit: int | None = Field(default=65_536, ge=4096)
    """Bytes of a connection's ``send_buffer`` that may wait there unsent
    (``TCP_NOTSENT_LOWAT``; Linux and macOS, ignored elsewhere); null: all
    of it.

    Bytes on the network, sent and not yet acknowledged, do not count, so a
    client far away still gets ``send_buffer`` in flight. A client that
    stops reading lets nothing more onto the network: this is what the
    kernel takes for it before further messages wait in ``send_queue``, and
    the client is found out when that overflows. Without the limit the
    server would first copy a whole ``send_buffer`` into the kernel for it,
    which, for many such clients at once, holds up everyone else.
    """

    allowed_origins: list[str] | None = None
    """``Origin`` values browsers may connect from (``"*"``: any,
    ``"https://*.example.com"``: any subdomain); null: any.

    Handshakes without an ``Origin`` header (clients that are not browsers)
    are always allowed: the check protects browsers, it is not authentication.
    """

    max_connections: int = Field(default=10_000, ge=1)
    """Open connections at most; further handshakes get HTTP 503."""

    compression: bool = False
    """Offer permessage-deflate; it costs CPU and memory per connection."""

    max_rooms: int = Field(default=100, ge=1)
    """Rooms one connection may be in at once."""

    room_rate: float = Field(default=20.0, gt=0)
    """``join_room``/``leave_room`` frames per second a client may send.

    Bursts of up to twice this are allowed; a client that sends more is
    closed with 1008.
    """

    auth: AuthSettings | None = None
    """The ``auth { ... }`` block: verify a JWT at the handshake; its claims
    become ``context.user``. Without it, nothing about a client is proven."""

    @field_validator("path")
    @classmethod
    def _path_starts_with_slash(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value:
            raise ValueError(f"path must start with '/' and hold no '?', not {value!r}")
        return value
