"""The ``websocket`` connector: rooms, broadcasts and per-client filters.

Clients connect to ``ws://HOST:PORT/PATH?k=v``; the query parameters become
``context.params`` of the connection (``?rooms=a,b`` also joins rooms at
once). See :mod:`mycel_ws._frames` for the frames both sides speak.

As a target, ``broadcast`` reaches every client and ``room:NAME`` the
clients in that room; a ``filter`` is evaluated per client by the hub, with
``context`` being that client's connection. As a source, ``message`` hands
the ``data`` of each message frame to the flow, and ``connect`` and
``disconnect`` announce connections.

Known limitations: ``disconnect`` events are not produced for connections
that the shutdown itself closes (sources have stopped by then); frames a
client sends are processed one at a time per connection, in order; and
``context.params`` are whatever the client wrote, so without an ``auth``
block a filter on them is not security. With one, a JWT is verified at the
handshake (HTTP 401 when refused), its claims are ``context.user``, the
connection closes with 4001 when the token expires unless an ``auth`` frame
brought a fresh one, and ``join_if`` guards ``join_room`` frames and
``?rooms=``.

"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import os
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from mycel import (
    ANONYMOUS,
    CLOSE_TOKEN_EXPIRED,
    Authenticator,
    AuthError,
    Connector,
    ConnectorError,
    Delivery,
    DeliveryError,
    Event,
    ExpiryTimer,
    FlowError,
    Identity,
    Message,
    Operation,
    SourceBinding,
    Subscriber,
    WriteBatch,
    check_origin,
    limit_sending,
)

from ._context import connection_context, query_params
from ._frames import (
    ClientFrame,
    FrameError,
    authenticated_frame,
    check_room,
    error_frame,
    message_frame,
    parse_frame,
    room_frame,
)
from ._settings import WebSocketSettings
from ._subscriber import FRAME_CACHE_KEY, SLOW_CONSUMER, WsSubscriber, write_failed

__all__ = ["WebSocketConnector"]

logger = logging.getLogger("mycel.ws")

SHUTTING_DOWN = "server shutting down"


@dataclass(slots=True)
class _Client:
    """What the server keeps per connection besides its hub subscriber."""

    connection: ServerConnection
    subscriber: Subscriber
    params: dict[str, str]
    tokens: float
    stamp: float
    identity: Identity
    expiry: ExpiryTimer
    closing: bool = False


class WebSocketConnector(Connector):
    """A WebSocket server; see the module docstring."""

    type_name = "websocket"
    settings_model = WebSocketSettings
    source_operations = (
        Operation("message", "the data of each message frame a client sends"),
        Operation("connect", "a client connected"),
        Operation("disconnect", "a client's connection closed"),
    )
    target_operations = (
        Operation("broadcast", "every connected client"),
        Operation("room:NAME", "the clients in room NAME", r"room:.+"),
    )
    fan_out = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, WebSocketSettings)
        self._settings: WebSocketSettings = self.settings
        self._server: Server | None = None
        self._accepting = False
        self._open: set[ServerConnection] = set()
        self._batch: WriteBatch[WsSubscriber] = WriteBatch(write_failed)
        self._auth: Authenticator | None = None
        # Who each connection is, from its handshake until _handle takes it.
        self._handshakes: dict[ServerConnection, tuple[Identity, dict[str, Any]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sources: dict[str, list[tuple[SourceBinding, asyncio.Semaphore]]] = {
            "message": [],
            "connect": [],
            "disconnect": [],
        }

    @property
    def port(self) -> int:
        """The port actually listened on (useful with ``port = 0``)."""
        if self._server is not None:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._settings.port

    @property
    def connection_count(self) -> int:
        """Connections accepted and not yet closed."""
        return len(self._open)

    def bind_source(self, binding: SourceBinding) -> None:
        super().bind_source(binding)
        limit = asyncio.Semaphore(binding.handle.concurrency)
        self._sources[binding.operation].append((binding, limit))

    # Lifecycle

    async def start(self) -> None:
        settings = self._settings
        if settings.auth is not None:
            # Keys load here: an unreadable key file stops start-up.
            self._auth = Authenticator(settings.auth, base_dir=self.services.base_dir)
        try:
            self._server = await serve(
                self._handle,
                settings.host,
                settings.port,
                process_request=self._check_handshake,
                compression="deflate" if settings.compression else None,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
                close_timeout=settings.close_timeout,
                max_size=settings.max_message_size,
                logger=logging.getLogger("mycel.ws.protocol"),
                server_header=None,
                # Room for bursts of handshakes (the kernel caps it at somaxconn).
                backlog=1024,
                # Under `mycel run --workers N`, the workers share the port.
                reuse_port=self.services.reuse_port,
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConnectorError(
                f"connector {self.name!r}: cannot listen on "
                f"{settings.host}:{settings.port}: {reason}"
            ) from exc
        for sock in self._server.sockets:
            limit_sending(sock, settings.send_buffer, settings.unsent_limit)
        logger.info(
            "connector %r listening on ws://%s:%d%s",
            self.name,
            settings.host,
            self.port,
            settings.path,
        )

    async def start_sources(self) -> None:
        self._accepting = True

    async def stop_sources(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        # The runtime has closed every hub subscriber by now, which sends
        # 1001 to each client; the server closes whatever is left the same way.
        server, self._server = self._server, None
        if server is not None:
            server.close(close_connections=True)
            try:
                async with asyncio.timeout(self._settings.close_timeout + 1.0):
                    await server.wait_closed()
            except TimeoutError:
                logger.warning(
                    "connector %r: %d connections did not close in time",
                    self.name,
                    len(self._open),
                )
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # Handshake

    def _check_handshake(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Refuse a handshake with an HTTP error that says why, or accept it."""
        settings = self._settings
        path = request.path.partition("?")[0]
        if path != settings.path:
            return _refuse(
                connection,
                http.HTTPStatus.NOT_FOUND,
                f"no WebSocket endpoint at {path}; connect to {settings.path}",
            )
        if not self._accepting:
            return _refuse(
                connection,
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "the server is not accepting connections (starting or shutting down)",
            )
        refusal = _origin_refusal(request.headers, settings.allowed_origins)
        if refusal is not None:
            return _refuse(connection, http.HTTPStatus.FORBIDDEN, refusal)
        if len(self._open) >= settings.max_connections:
            return _refuse(
                connection,
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections: this server takes at most "
                f"{settings.max_connections}",
            )
        params = query_params(request.path)
        try:
            rooms = _initial_rooms(params, settings.max_rooms)
        except FrameError as exc:
            return _refuse(connection, http.HTTPStatus.BAD_REQUEST, f"rooms: {exc}")
        identity = ANONYMOUS
        auth = self._auth
        if auth is not None:
            headers = dict(request.headers.raw_items())
            try:
                identity = auth.authenticate(
                    headers, params, _cookies(request.headers.get_all("Cookie"))
                )
            except AuthError as exc:
                response = _refuse(connection, http.HTTPStatus.UNAUTHORIZED, exc.reason)
                response.headers["WWW-Authenticate"] = exc.www_authenticate
                return response
        context = connection_context(str(connection.id), params, identity, auth)
        if auth is not None:
            for room in rooms:
                if not auth.may_join(context, room):
                    return _refuse(
                        connection,
                        http.HTTPStatus.FORBIDDEN,
                        f"not allowed to join {room!r}",
                    )

        # Hold a place until the TCP connection is gone, whatever happens.
        self._open.add(connection)
        self._handshakes[connection] = (identity, context)

        def lost(_: object) -> None:
            self._open.discard(connection)
            self._handshakes.pop(connection, None)

        connection.connection_lost_waiter.add_done_callback(lost)
        return None

    # Connections

    async def _handle(self, connection: ServerConnection) -> None:
        """Serve one connection from the handshake to its close."""
        assert connection.request is not None
        rooms = _initial_rooms(
            query_params(connection.request.path), self._settings.max_rooms
        )
        identity, context = self._handshakes.pop(connection)
        params = context["params"]

        # Enter the hub and the rooms first, so that nothing is missed.
        subscriber = self.services.hub.subscribe(
            context,
            rooms,
            queue_size=self._settings.send_queue,
            on_close=self._subscriber_closed,
            factory=functools.partial(
                WsSubscriber, connection=connection, batch=self._batch
            ),
        )
        loop = asyncio.get_running_loop()
        expiry = ExpiryTimer(
            lambda: self._start_closing(
                connection, CLOSE_TOKEN_EXPIRED, "token expired"
            )
        )
        client = _Client(
            connection,
            subscriber,
            params,
            2 * self._settings.room_rate,
            loop.time(),
            identity,
            expiry,
        )
        expiry.schedule(identity)
        logger.debug("connection %s open with %s", connection.id, params)
        try:
            for room in rooms:
                await connection.send(room_frame("joined", room), text=True)
            await self._emit("connect", _connection_event(client), context)
            async for raw in connection:
                # Once closing, frames are read only to reach the client's
                # close frame (websockets stops reading when 16 are waiting).
                if not client.closing:
                    await self._on_frame(client, raw)
        except ConnectionClosed:
            pass
        finally:
            expiry.cancel()
            subscriber.close("connection closed")
            if self._accepting:
                event = _connection_event(client)
                event["code"], event["reason"] = _close_of(connection)
                await self._emit("disconnect", event, context)
            logger.debug(
                "connection %s closed: %s %s",
                connection.id,
                connection.close_code,
                connection.close_reason,
            )

    async def _on_frame(self, client: _Client, raw: str | bytes) -> None:
        """Act on one client frame."""
        connection = client.connection
        try:
            frame = parse_frame(raw)
        except FrameError as exc:
            await connection.send(error_frame(str(exc)), text=True)
            return
        if frame.type == "message":
            await self._on_message(client, frame)
            return
        if frame.type == "auth":
            await self._on_auth(client, frame.data)
            return
        if not self._take_room_token(client):
            client.closing = True
            self._start_closing(
                connection,
                CloseCode.POLICY_VIOLATION,
                f"too many join_room/leave_room frames "
                f"(at most {self._settings.room_rate:g} per second)",
            )
            return
        await self._on_room(client, frame)

    async def _on_room(self, client: _Client, frame: ClientFrame) -> None:
        hub = self.services.hub
        subscriber = client.subscriber
        room = frame.room
        if frame.type == "leave_room":
            hub.leave(subscriber, room)
            await client.connection.send(room_frame("left", room), text=True)
            return
        limit = self._settings.max_rooms
        if room not in subscriber.topics and len(subscriber.topics) >= limit:
            message = f"cannot join {room!r}: already in {limit} rooms (max_rooms)"
            await client.connection.send(error_frame(message), text=True)
            return
        auth = self._auth
        if auth is not None and not auth.may_join(subscriber.context, room):
            message = f"not allowed to join {room!r}"
            await client.connection.send(error_frame(message), text=True)
            return
        hub.join(subscriber, room)
        await client.connection.send(room_frame("joined", room), text=True)

    async def _on_auth(self, client: _Client, token: str) -> None:
        """A fresh token: the connection lives until it expires instead."""
        connection = client.connection
        if self._auth is None:
            message = "this server takes no auth frames (no auth block)"
            await connection.send(error_frame(message), text=True)
            return
        try:
            identity = self._auth.refresh(client.identity, token)
        except AuthError as exc:
            await connection.send(error_frame(exc.reason), text=True)
            return
        client.identity = identity
        client.expiry.schedule(identity)
        await connection.send(authenticated_frame(identity.expires_at), text=True)

    async def _on_message(self, client: _Client, frame: ClientFrame) -> None:
        connection = client.connection
        if not self._sources["message"]:
            await connection.send(
                error_frame("this server takes no message frames"), text=True
            )
            return
        if not self._accepting:
            await connection.send(error_frame("the server is shutting down"), text=True)
            return
        failed = await self._emit("message", frame.data, client.subscriber.context)
        if failed:
            await connection.send(
                error_frame("the message could not be processed"), text=True
            )

    def _take_room_token(self, client: _Client) -> bool:
        # A token bucket: room_rate per second, bursts of twice that.
        rate = self._settings.room_rate
        now = asyncio.get_running_loop().time()
        client.tokens = min(2 * rate, client.tokens + (now - client.stamp) * rate)
        client.stamp = now
        if client.tokens < 1.0:
            return False
        client.tokens -= 1.0
        return True

    async def _emit(self, operation: str, input: Any, context: Any) -> bool:
        """Run the flows bound to ``operation``; True if any gave up."""
        failed = False
        for binding, limit in self._sources[operation]:
            async with limit:
                try:
                    await binding.handle.process(Event(input, context))
                except FlowError as exc:
                    logger.warning(
                        "connector %r: flow %r gave up on a %s event: %s",
                        self.name,
                        binding.flow,
                        operation,
                        exc,
                    )
                    failed = True
        return failed

    def _subscriber_closed(self, subscriber: Subscriber, reason: str) -> None:
        """Close the connection of a subscriber the hub or runtime closed."""
        assert isinstance(subscriber, WsSubscriber)
        connection = subscriber.connection
        if reason.startswith(SLOW_CONSUMER):
            code = CloseCode.POLICY_VIOLATION
            self.services.metrics.slow_dropped.labels(self.name).inc()
            logger.warning(
                "connector %r: closing connection %s: %s",
                self.name,
                connection.id,
                reason,
            )
        elif reason == SHUTTING_DOWN:
            code = CloseCode.GOING_AWAY
        else:
            return  # the connection itself is ending
        self._start_closing(connection, code, reason)

    def _start_closing(
        self, connection: ServerConnection, code: int, reason: str
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._close_connection(connection, code, reason)
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_connection(
        self, connection: ServerConnection, code: int, reason: str
    ) -> None:
        # close() waits for the client to read up to the close frame; a
        # client that never reads is cut off after close_timeout.
        try:
            async with asyncio.timeout(self._settings.close_timeout):
                await connection.close(code, reason)
        except TimeoutError:
            connection.transport.abort()

    # Target

    async def deliver(self, delivery: Delivery) -> None:
        operation = delivery.operation
        if operation == "broadcast":
            room: str | None = None
        elif operation.startswith("room:"):
            try:
                room = check_room(operation[5:])
            except FrameError as exc:
                raise DeliveryError(
                    f"operation {operation!r}: {exc}", permanent=True
                ) from exc
        else:
            raise DeliveryError(
                f"unknown operation {operation!r}; use broadcast or room:NAME",
                permanent=True,
            )

        # Encode once; every client gets the same bytes.
        try:
            data = message_frame(room, delivery.payload)
        except (TypeError, ValueError) as exc:
            raise DeliveryError(
                f"the payload cannot be sent as JSON: {exc}", permanent=True
            ) from exc
        message = Message(
            room,
            delivery.input,
            delivery.payload,
            flow=delivery.flow,
            options=delivery.options,
        )
        message.cache[FRAME_CACHE_KEY] = data
        self.services.hub.publish(room, message, delivery.filter)


def _refuse(
    connection: ServerConnection, status: http.HTTPStatus, text: str
) -> Response:
    logger.debug("handshake refused with %d: %s", status.value, text)
    return connection.respond(status, text + "\n")


def _origin_refusal(headers: Headers, allowed: list[str] | None) -> str | None:
    if allowed is None or "*" in allowed:
        return None
    origins = headers.get_all("Origin")
    if not origins:
        return None  # not a browser; see the allowed_origins setting
    if len(origins) > 1:
        return "more than one Origin header"
    if not check_origin(origins[0], allowed):
        return f"origin {origins[0]!r} is not allowed"
    return None


def _cookies(headers: list[str]) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in headers:
        try:
            jar.load(header)
        except CookieError:
            continue
    return {name: morsel.value for name, morsel in jar.items()}


def _initial_rooms(params: dict[str, str], limit: int) -> list[str]:
    text = params.get("rooms", "")
    if not text:
        return []
    rooms = list(dict.fromkeys(check_room(r.strip()) for r in text.split(",")))
    if len(rooms) > limit:
        raise FrameError(f"at most {limit} rooms (max_rooms), not {len(rooms)}")
    return rooms


def _close_of(connection: ServerConnection) -> tuple[int, str]:
    """The close code and reason of whichever side closed first.

    A dead client sends nothing: then it is the server's (1011 after a
    failed ping); 1006 when no close frame went either way.

    """
    protocol = connection.protocol
    first = protocol.close_sent
    if protocol.close_rcvd is not None and protocol.close_rcvd_then_sent is not False:
        first = protocol.close_rcvd
    if first is None:
        return int(CloseCode.ABNORMAL_CLOSURE), ""
    return first.code, first.reason


def _connection_event(client: _Client) -> dict[str, Any]:
    return {
        "id": str(client.connection.id),
        "params": dict(client.params),
        "rooms": sorted(client.subscriber.topics),
    }
