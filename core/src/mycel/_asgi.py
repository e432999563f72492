"""Serving an ASGI application inside a running Mycel process.

The admin endpoint, the ``http`` connector, and the SSE and GraphQL plugins
all serve ASGI applications with uvicorn. uvicorn's ``Server.serve()``
installs its own SIGINT/SIGTERM handlers, which would take shutdown away
from the runtime; :class:`AsgiServer` keeps the runtime in charge and turns
a port that cannot be bound into a :class:`~mycel.errors.ConnectorError`.

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from .errors import ConnectorError

__all__ = ["AsgiServer", "limit_sending"]


def limit_sending(
    sock: socket.socket, send_buffer: int | None, unsent_limit: int | None
) -> None:
    """Bound what the kernel holds for each connection ``sock`` accepts.

    Set on a listening socket, Linux copies both options to every
    connection it accepts. ``send_buffer`` is the kernel's send buffer
    (``SO_SNDBUF``, which Linux doubles), bytes sent and not yet
    acknowledged included; ``unsent_limit`` is how much of it may wait
    unsent (``TCP_NOTSENT_LOWAT``, where the platform has it; elsewhere it
    is ignored). None leaves either to the kernel.

    The second is what lets a server find a client that stopped reading
    early: once that much waits for it, the kernel takes no more, the
    server's own buffer for it fills and its send queue overflows. Bytes
    in flight do not count, so a client far away that does read still
    gets ``send_buffer`` on the network.
    """
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    if unsent_limit is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, unsent_limit)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The runtime handles signals and stops us; see the module docstring.
        yield


class AsgiServer:
    """An ASGI app served by uvicorn on ``host:port`` until :meth:`stop`.

    ``port=0`` binds a free port; :attr:`port` tells which once started.
    ``reuse_port`` sets SO_REUSEPORT so that several processes can share the
    port. ``send_buffer`` and ``unsent_limit`` bound what the kernel holds
    for every accepted connection (see :func:`limit_sending`); None leaves
    them to the kernel. Extra keyword arguments go to
    :class:`uvicorn.Config`.

    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        send_buffer: int | None = None,
        unsent_limit: int | None = None,
        **options: Any,
    ) -> None:
        self.host = host
        self.port = port
        self._reuse_port = reuse_port
        self._send_buffer = send_buffer
        self._unsent_limit = unsent_limit
        options.setdefault("log_level", "warning")
        options.setdefault("lifespan", "off")
        options.setdefault("access_log", False)
        self._config = uvicorn.Config(app, host=host, port=port, **options)
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without it, Nagle's algorithm
        # holds the body of a response behind its headers until the
        # client's delayed ACK, 40 ms per request on a kept-alive connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        limit_sending(sock, self._send_buffer, self._unsent_limit)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConnectorError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        sock.set_inheritable(True)
        return sock

    async def start(self) -> None:
        """Bind and start serving; raise ConnectorError if that fails."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._serve(sock))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise ConnectorError(f"server on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits on start-up failures
            raise ConnectorError(
                f"server on {self.host}:{self.port} failed to start"
            ) from exc

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close connections, and wait for the server."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(Exception):
                await self._task
        except ConnectorError:
            logging.getLogger("mycel.run").debug("server stopped with an error")
        self._task = None
