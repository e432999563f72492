"""The two WebSocket subprotocols of GraphQL subscriptions, over the hub.

``graphql-transport-ws`` (the graphql-ws library's protocol) is spoken with
its whole message set and close codes:

==== ==========================================================
4400 a message that is not JSON, not of the protocol, or malformed
4001 the connection's token expired (``auth``), see docs/auth.md
4401 ``subscribe`` before the connection was acknowledged, or the
     ``connection_init`` brought no acceptable token (``auth``)
4403 the connection was refused by :func:`connection_context`
4406 no subprotocol this server speaks was offered
4408 no ``connection_init`` within ``connection_init_timeout``
4409 a ``subscribe`` whose id is already in use
4429 a second ``connection_init``
==== ==========================================================

The older ``graphql-ws`` subprotocol (subscriptions-transport-ws) is spoken
for older clients: ``connection_init``/``start``/``stop``/
``connection_terminate`` in, ``connection_ack``/``connection_error``/
``ka``/``data``/``error``/``complete`` out.

Each subscription is one :class:`mycel.Subscriber` of the connector's hub,
whose context (see :func:`connection_context`) holds the
``connection_init`` payload, so that a ``to`` block's filter is evaluated
per subscription by the hub. The ``payload`` part of the message is encoded
once per event and document and spliced after a per-subscription prefix
holding the id. Served by :class:`~mycel_graphql._frames.FrameProtocol`,
the hub writes each frame straight into the connection (see
:mod:`mycel_graphql._frames`); under any other ASGI server, a writer task
per subscription sends what the hub queued.

"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import mycel

from ._frames import FRAMES_EXTENSION, FrameProtocol, FrameSubscriber
from ._schema import Plan, dumps

if TYPE_CHECKING:
    from ._settings import GraphqlSettings

__all__ = [
    "GRAPHQL_TRANSPORT_WS",
    "GRAPHQL_WS",
    "Connection",
    "choose_subprotocol",
    "connection_context",
]

logger = logging.getLogger("mycel.graphql")

GRAPHQL_TRANSPORT_WS = "graphql-transport-ws"
GRAPHQL_WS = "graphql-ws"

Send = Callable[[Mapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

DROP_TIMEOUT = 5.0
"""Seconds a dropped slow consumer has to take its close frame."""

_HIDDEN_HEADERS = {
    "authorization",
    "cookie",
    "proxy-authorization",
    "sec-websocket-key",
}


def choose_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to answer with: graphql-transport-ws first."""
    for protocol in (GRAPHQL_TRANSPORT_WS, GRAPHQL_WS):
        if protocol in offered:
            return protocol
    return None


def connection_context(
    connection_params: Mapping[str, Any],
    headers: Mapping[str, str],
    identity: mycel.Identity | None = None,
    *,
    drop: Sequence[str] = (),
) -> dict[str, Any] | None:
    """The ``context`` of one connection, built once at ``connection_init``.

    ``connection_params`` is the ``connection_init`` payload (without the
    keys in ``drop``: the token's), found both as ``params`` and, as before
    ``auth`` existed, ``connection_params``; ``headers`` the handshake's
    headers (lowercase names, credentials left out). ``identity``'s verified
    claims become ``user``, which nothing the client sends can set.
    Returning None refuses the connection (4403 in graphql-transport-ws,
    ``connection_error`` in graphql-ws). Each subscription's context is
    this one plus ``operation`` and ``args``.

    """
    params = {k: v for k, v in connection_params.items() if k not in drop}
    return mycel.build_context(
        params,
        identity,
        {
            "connection_params": params,
            "headers": {k: v for k, v in headers.items() if k not in _HIDDEN_HEADERS},
        },
    )


class _Close(Exception):
    """Close the connection with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    """One WebSocket connection, after the subprotocol was chosen."""

    def __init__(
        self,
        server: Any,
        settings: GraphqlSettings,
        *,
        scope: Mapping[str, Any],
        receive: Receive,
        send: Send,
        protocol: str,
        auth: mycel.Authenticator | None = None,
        identity: mycel.Identity | None = mycel.ANONYMOUS,
    ) -> None:
        self.server = server
        self.auth = auth
        self.identity = identity
        """Who the client is; None until ``connection_init`` brings a token."""
        self.expiry = mycel.ExpiryTimer(self._expired)
        self.settings = settings
        self.receive = receive
        self._send = send
        self.legacy = protocol == GRAPHQL_WS
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope.get("headers", ())
        }
        self.client = scope.get("client")
        self.context: dict[str, Any] | None = None
        self.init_received = False
        self.acknowledged = False
        self.closed = False
        self.operations: dict[
            str, tuple[mycel.Subscriber | None, asyncio.Task[None] | None]
        ] = {}
        extension = scope.get("extensions", {}).get(FRAMES_EXTENSION, {})
        self.writer: FrameProtocol | None = extension.get("writer")
        """Where frames go without ASGI; None: through a task and ``send``."""
        self.batch: mycel.WriteBatch[FrameProtocol] = server.batch
        self._timers: list[asyncio.Task[None]] = []
        self._ping_timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        """The task running :meth:`run`, cancelled to abort a stuck peer."""

    # Sending

    async def send_text(self, text: str) -> None:
        if self.closed:
            return
        try:
            await self._send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError) as exc:
            # The peer went away while we wrote; the receive loop ends too.
            logger.debug("send to %s failed: %s", self.client, exc)
            self.closed = True

    async def send_json(self, message: Mapping[str, Any]) -> None:
        await self.send_text(dumps(message))

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, RuntimeError):
            await self._send(
                {"type": "websocket.close", "code": code, "reason": reason[:120]}
            )

    # The receive loop

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        self._timers.append(asyncio.create_task(self._init_timeout()))
        try:
            while not self.closed:
                event = await self.receive()
                kind = event["type"]
                if kind == "websocket.disconnect":
                    self.closed = True
                    break
                if kind != "websocket.receive":
                    continue
                text = event.get("text")
                if text is None:
                    data = event.get("bytes") or b""
                    text = data.decode("utf-8", "replace")
                try:
                    await self._handle(text)
                except _Close as close:
                    await self.close(close.code, close.reason)
        except Exception:  # top of the connection's loop: a bug of ours
            logger.error("connection of %s failed", self.client, exc_info=True)
            await self.close(1011, "Internal error")
        finally:
            self.closed = True
            self._stop_all()

    def _stop_all(self) -> None:
        self.expiry.cancel()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        for timer in self._timers:
            timer.cancel()
        operations = list(self.operations.values())
        self.operations.clear()
        for sub, task in operations:
            if sub is not None:
                sub.close("connection closed")
            if task is not None:
                task.cancel()

    async def _init_timeout(self) -> None:
        await asyncio.sleep(self.settings.subscriptions.connection_init_timeout)
        if not self.init_received and not self.closed:
            await self.close(4408, "Connection initialisation timeout")

    async def _keepalive(self) -> None:
        interval = self.settings.subscriptions.keepalive
        text = '{"type":"ka"}' if self.legacy else '{"type":"ping"}'
        while not self.closed:
            await asyncio.sleep(interval)
            await self.send_text(text)

    # Messages

    async def _handle(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError as exc:
            if self.legacy:
                await self.send_json(
                    {"type": "connection_error", "payload": {"message": str(exc)}}
                )
                return
            raise _Close(4400, f"Invalid message received: {exc}") from exc
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            if self.legacy:
                await self.send_json(
                    {"type": "error", "payload": {"message": "Invalid message type!"}}
                )
                return
            raise _Close(4400, "Invalid message received")
        if self.legacy:
            await self._legacy(message)
        else:
            await self._transport_ws(message)

    async def _transport_ws(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "connection_init":
            payload = _object_payload(message)
            if self.init_received:
                raise _Close(4429, "Too many initialisation requests")
            self.init_received = True
            try:
                accepted = self._accept_connection(payload or {})
            except mycel.AuthError as exc:
                raise _Close(mycel.GRAPHQL_WS_UNAUTHORIZED, exc.reason) from exc
            if not accepted:
                raise _Close(4403, "Forbidden")
            self.acknowledged = True
            await self.send_text('{"type":"connection_ack"}')
            self._start_keepalive()
        elif kind == "ping":
            payload = _object_payload(message)
            token = None
            if self.auth is not None and payload:
                token = self.auth.token_from(payload=payload)
            if token is None:
                await self.send_text('{"type":"pong"}')
            else:
                await self.send_json({"type": "pong", "payload": self._refresh(token)})
        elif kind == "pong":
            _object_payload(message)
        elif kind == "subscribe":
            op_id = _message_id(message)
            payload = message.get("payload")
            request = _subscribe_payload(payload)
            if not self.acknowledged:
                raise _Close(4401, "Unauthorized")
            if op_id in self.operations:
                raise _Close(4409, f"Subscriber for {op_id} already exists")
            await self._subscribe(op_id, *request)
        elif kind == "complete":
            op_id = _message_id(message)
            self._stop(op_id)
        else:
            raise _Close(4400, f"Unexpected message of type {kind} received")

    async def _legacy(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        op_id = message.get("id")
        if kind == "connection_init":
            payload = message.get("payload")
            self.init_received = True
            try:
                accepted = isinstance(
                    payload, dict | type(None)
                ) and self._accept_connection(payload or {})
            except mycel.AuthError as exc:
                await self.send_json(
                    {"type": "connection_error", "payload": {"message": exc.reason}}
                )
                raise _Close(mycel.GRAPHQL_WS_UNAUTHORIZED, exc.reason) from exc
            if not accepted:
                await self.send_json(
                    {"type": "connection_error", "payload": {"message": "Forbidden"}}
                )
                raise _Close(1011, "Forbidden")
            self.acknowledged = True
            await self.send_text('{"type":"connection_ack"}')
            if self.settings.subscriptions.keepalive > 0:
                await self.send_text('{"type":"ka"}')
            self._start_keepalive()
        elif kind == "start":
            if not isinstance(op_id, str | int) or op_id == "":
                await self._legacy_error(None, "Invalid message: start needs an id")
                return
            op_id = str(op_id)
            if not self.acknowledged:
                await self._legacy_error(
                    op_id, "connection not initialised: send connection_init first"
                )
                return
            try:
                request = _subscribe_payload(message.get("payload"))
            except _Close as exc:
                await self._legacy_error(op_id, exc.reason)
                return
            # subscriptions-transport-ws replaces an operation with the same id.
            self._stop(op_id)
            await self._subscribe(op_id, *request)
        elif kind == "stop":
            if op_id is not None:
                self._stop(str(op_id))
        elif kind == "connection_terminate":
            raise _Close(1000, "terminated")
        else:
            await self._legacy_error(
                str(op_id) if op_id is not None else None, "Invalid message type!"
            )

    async def _legacy_error(self, op_id: str | None, text: str) -> None:
        message: dict[str, Any] = {"type": "error", "payload": {"message": text}}
        if op_id is not None:
            message["id"] = op_id
        await self.send_json(message)

    def _accept_connection(self, params: dict[str, Any]) -> bool:
        """Build the context; :class:`mycel.AuthError` refuses the token."""
        drop: list[str] = []
        if self.auth is not None:
            if self.identity is None:
                # No token in the handshake: the payload may bring one.
                self.identity = self.auth.authenticate(payload=params)
            settings = self.auth.settings
            drop = [k for k in (settings.connection_param,) if k]
            if settings.header:
                drop += [k for k in params if k.lower() == settings.header.lower()]
        self.context = connection_context(
            params, self.headers, self.identity, drop=drop
        )
        if self.context is not None and self.identity is not None:
            self.expiry.schedule(self.identity)
        return self.context is not None

    def _refresh(self, token: str) -> dict[str, Any]:
        """A ``ping`` carrying a fresh token: the ``pong`` payload."""
        assert self.auth is not None
        if self.identity is None or not self.acknowledged:
            return {"error": "connection not acknowledged"}
        try:
            identity = self.auth.refresh(self.identity, token)
        except mycel.AuthError as exc:
            return {"error": exc.reason}
        self.identity = identity
        self.expiry.schedule(identity)
        return {"expires_at": _unix(identity.expires_at)}

    def _expired(self) -> None:
        logger.info("connection of %s: token expired", self.client)
        self._timers.append(
            asyncio.create_task(self.close(mycel.CLOSE_TOKEN_EXPIRED, "token expired"))
        )

    def _start_keepalive(self) -> None:
        if self.settings.subscriptions.keepalive <= 0:
            return
        if self.writer is None:
            self._timers.append(asyncio.create_task(self._keepalive()))
            return
        # A timer, not a task: thousands of idle connections tick cheaply.
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(
            self.settings.subscriptions.keepalive, self._ping
        )

    def _ping(self) -> None:
        """Write the keepalive message the way subscription frames go."""
        writer = self.writer
        if self.closed or writer is None or not writer.open:
            return
        if not writer.paused:
            # A client with a full buffer has data coming; no ping needed.
            writer.buffer_text(b'{"type":"ka"}' if self.legacy else b'{"type":"ping"}')
            writer.write_soon(self.batch)
        self._start_keepalive()

    # Operations

    async def _subscribe(
        self,
        op_id: str,
        query: str,
        variables: dict[str, Any] | None,
        operation_name: str | None,
    ) -> None:
        plan = self.server.served.plan(query, operation_name, variables)
        if isinstance(plan, list):
            await self._send_errors(op_id, plan)
            return
        if plan.field is None:
            # A query or mutation over the socket: one result, then complete.
            result = plan.execute_once()
            await self.send_json(self._next(op_id, result))
            await self.send_json({"id": op_id, "type": "complete"})
            return
        assert self.context is not None, "subscribe before acknowledgement"
        if self.auth is not None and not self.auth.may_join(self.context, plan.field):
            await self._send_errors(
                op_id, [{"message": f"not allowed to join {plan.field!r}"}]
            )
            return
        context = {
            **self.context,
            "operation": f"Subscription.{plan.field}",
            "args": plan.args,
        }
        prefix = '{"id":' + dumps(op_id) + ',"type":"' + self._kind + '","payload":'
        if self.writer is not None:
            # The hub writes the frames itself; see mycel_graphql._frames.
            sub = self.server.hub.subscribe(
                context,
                (plan.field,),
                queue_size=self.settings.queue_size,
                on_close=self._subscriber_closed,
                factory=functools.partial(
                    FrameSubscriber,
                    writer=self.writer,
                    batch=self.batch,
                    op_id=op_id,
                    plan=plan,
                    prefix=prefix,
                ),
            )
            self.operations[op_id] = (sub, None)
            return
        sub = self.server.hub.subscribe(
            context,
            (plan.field,),
            queue_size=self.settings.queue_size,
            on_close=self._subscriber_closed,
        )
        task = asyncio.create_task(self._pump(op_id, prefix, plan, sub))
        self.operations[op_id] = (sub, task)

    @property
    def _kind(self) -> str:
        return "data" if self.legacy else "next"

    def _next(self, op_id: str, payload: Any) -> dict[str, Any]:
        kind = "data" if self.legacy else "next"
        return {"id": op_id, "type": kind, "payload": payload}

    async def _send_errors(self, op_id: str, errors: list[dict[str, Any]]) -> None:
        if self.legacy:
            await self.send_json(self._next(op_id, {"errors": errors}))
            await self.send_json({"id": op_id, "type": "complete"})
        else:
            await self.send_json({"id": op_id, "type": "error", "payload": errors})

    def _stop(self, op_id: str) -> None:
        found = self.operations.pop(op_id, None)
        if found is None:
            return
        sub, task = found
        if sub is not None:
            sub.close("complete")
        if task is not None:
            task.cancel()

    async def _pump(
        self, op_id: str, prefix: str, plan: Plan, sub: mycel.Subscriber
    ) -> None:
        """Send what the hub queued for one subscription, in order."""
        send = self._send
        try:
            while True:
                message = await sub.get()
                text = prefix + plan.payload_json(message.payload, message.cache) + "}"
                if self.closed:
                    return
                try:
                    await send({"type": "websocket.send", "text": text})
                except (OSError, RuntimeError):
                    self.closed = True
                    return
        except mycel.SubscriberClosed as exc:
            await self._ended(op_id, exc.reason)

    def _subscriber_closed(self, sub: mycel.Subscriber, reason: str) -> None:
        # The hub stopped queueing for this subscription; the writer may be
        # stuck in a send to a peer that does not read, so drop from here.
        if reason.startswith("slow consumer") and not self.closed:
            logger.warning("connection of %s dropped: %s", self.client, reason)
            self._timers.append(asyncio.create_task(self._drop(reason)))
        # Without a writer task, nobody else sees that the subscription ended.
        if isinstance(sub, FrameSubscriber):
            found = self.operations.get(sub.op_id)
            if found is not None and found[0] is sub:
                del self.operations[sub.op_id]
            if reason not in ("complete", "connection closed") and not self.closed:
                self._timers.append(
                    asyncio.create_task(self._announce_end(sub.op_id, reason))
                )

    async def _drop(self, reason: str) -> None:
        try:
            await asyncio.wait_for(self.close(1008, reason), DROP_TIMEOUT)
        except TimeoutError:
            # The peer reads nothing, not even our close frame: abort.
            if self.task is not None:
                self.task.cancel()

    async def _ended(self, op_id: str, reason: str) -> None:
        self.operations.pop(op_id, None)
        await self._announce_end(op_id, reason)

    async def _announce_end(self, op_id: str, reason: str) -> None:
        """Tell the client that the server ended a subscription, and why."""
        if reason.startswith("slow consumer"):
            pass  # _subscriber_closed closes the connection
        elif reason == "server shutting down":
            await self.close(1001, "Going away")
        elif reason not in ("complete", "connection closed"):
            await self.send_json({"id": op_id, "type": "complete"})


def _unix(moment: float | None) -> float | int | None:
    """A Unix time for a client: whole seconds stay integers."""
    if moment is not None and moment.is_integer():
        return int(moment)
    return moment


def _object_payload(message: dict[str, Any]) -> dict[str, Any] | None:
    payload = message.get("payload")
    if payload is not None and not isinstance(payload, dict):
        raise _Close(
            4400,
            f"\"{message['type']}\" message expects the 'payload' property to be "
            "an object or nullish or missing",
        )
    return payload


def _message_id(message: dict[str, Any]) -> str:
    op_id = message.get("id")
    if not isinstance(op_id, str) or not op_id:
        raise _Close(
            4400,
            f"\"{message['type']}\" message requires a non-empty 'id' property",
        )
    return op_id


def _subscribe_payload(
    payload: Any,
) -> tuple[str, dict[str, Any] | None, str | None]:
    if not isinstance(payload, dict):
        raise _Close(
            4400, "\"subscribe\" message expects the 'payload' property to be an object"
        )
    query = payload.get("query")
    if not isinstance(query, str):
        raise _Close(
            4400,
            "\"subscribe\" message payload expects the 'query' property to be a string",
        )
    variables = payload.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise _Close(
            4400,
            "\"subscribe\" message payload expects the 'variables' property to be "
            "an object or nullish or missing",
        )
    name = payload.get("operationName")
    if name is not None and not isinstance(name, str):
        raise _Close(
            4400,
            "\"subscribe\" message payload expects the 'operationName' property to "
            "be a string or nullish or missing",
        )
    return query, variables, name
