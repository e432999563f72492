"""The ``sse`` connector: Server-Sent Events streams with filters and replay.

Clients ``GET PATH/STREAM?k=v`` (or ``GET PATH`` for broadcasts only) and
receive ``text/event-stream``; the query parameters become
``context.params`` for the filters of the ``to`` blocks. ``broadcast``
reaches every client, ``stream:NAME`` the clients of that stream. Event ids,
replay and the gap signal are described in :mod:`mycel_sse._history`.

Each client has a bounded send queue. A client that falls ``send_queue``
events behind, or accepts nothing for ``send_timeout``, is disconnected
(logged at WARNING); the others never wait for it. How events reach the
socket (written from the hub, one write per client and loop iteration,
no task per event) is described in :mod:`mycel_sse._stream`.

In a cluster (a ``cluster { backplane = ... }`` block), every event is
appended to one shared log in the backplane, ``sse:<connector>``, and each
process follows that log: it numbers events by their log position, keeps
the same bounded histories as a single process would, and delivers to its
own clients. A client that reconnects to another process is replayed what
it missed from there; a process that starts reads the retained log first.
Ids then read ``<connector-hash>-<number>`` and are the same on every
process. A ``to`` succeeds once the backplane has the event.

With an ``auth`` block a JWT is verified when a stream opens (HTTP 401 when
refused), its claims are ``context.user``, ``join_if`` guards stream names
(HTTP 403), and when the token expires the client gets a ``token_expired``
event and its stream ends. With ``cors``, an ``Origin`` not among its
origins gets HTTP 403.

Known limitations: without a cluster, ids and history live in memory, so a
restart loses the history (reconnecting clients get the ``gap`` event). A
history is kept for every stream name that was ever published to, until
the process stops. In a cluster, the shared log keeps at most
``history_size`` x 16 events of all streams together, so a client of a
rarely used stream may get a ``gap`` sooner than without one.

"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mycel import (
    AsgiServer,
    Authenticator,
    AuthError,
    ClusteredHub,
    Connector,
    Delivery,
    DeliveryError,
    ExpiryTimer,
    Identity,
    Message,
    Operation,
    Settings,
    backplane_decode,
    backplane_encode,
    build_context,
    check_origin,
)

from ._history import (
    Entry,
    EventIds,
    History,
    encode_event,
    encode_gap,
    replay,
)
from ._settings import STREAM_NAME, SseSettings, SseToOptions
from ._stream import EXPIRED, CaptureSend, EventStream, QuietCut, SseClient, Streams

__all__ = ["SseConnector"]

logger = logging.getLogger("mycel.sse")

_STREAM_RULE = "use 1 to 128 letters, digits, '_', '-' or '.'"

_QUIET_CUT = QuietCut()


class SseConnector(Connector):
    """Server-Sent Events to browsers; see the module docstring."""

    type_name = "sse"
    settings_model = SseSettings
    target_operations = (
        Operation("broadcast", "every client, on any stream"),
        Operation(
            "stream:NAME",
            "clients of stream NAME (GET PATH/NAME)",
            r"stream:[A-Za-z0-9_.\-]{1,128}",
        ),
    )
    default_operation = "broadcast"
    to_options: ClassVar[type[Settings] | None] = SseToOptions
    fan_out = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, SseSettings)
        self._settings: SseSettings = self.settings
        self._ids = EventIds()
        self._histories: dict[str | None, History] = {}
        self._streams: set[str] = set()
        self._any_stream = False
        self._server: AsgiServer | None = None
        self._auth: Authenticator | None = None
        self._live = Streams(
            self.name,
            self._settings.send_timeout,
            self.services.metrics.slow_dropped.labels(self.name).inc,
        )
        self._timers: list[asyncio.Task[None]] = []
        self._backplane = self.services.backplane
        self._follower: asyncio.Task[None] | None = None
        self._floor: int | None = None
        """In a cluster: the first entry of the shared log this process read."""
        if self._backplane is not None:
            # Every process must give the same event the same id.
            seed = f"{self._backplane.namespace}:{self.name}".encode()
            epoch = hashlib.sha1(seed, usedforsecurity=False).hexdigest()[:8]
            self._ids = EventIds(epoch, strict=False)

    @property
    def port(self) -> int:
        """The port actually listened on (useful with ``port = 0``)."""
        return self._server.port if self._server else self._settings.port

    @property
    def epoch(self) -> str:
        """The first part of every event id of this run."""
        return self._ids.epoch

    # Configuration

    def bind_target(self, operation: str, options: Settings | None) -> None:
        if not operation.startswith("stream:"):
            return
        if "${" in operation:
            self._any_stream = True
        else:
            self._streams.add(operation.removeprefix("stream:"))

    # Lifecycle

    async def start(self) -> None:
        settings = self._settings
        if settings.auth is not None:
            # Keys load here: an unreadable key file stops start-up.
            self._auth = Authenticator(settings.auth, base_dir=self.services.base_dir)
        path = settings.path
        routes = [
            Route(path, self._open, methods=["GET"]),
            Route(path + "/{stream:mycel_sse_any}", self._open, methods=["GET"]),
        ]
        middleware = []
        if settings.cors is not None:
            cors = settings.cors
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=cors.origins,
                    allow_methods=["GET"],
                    allow_headers=["Last-Event-ID", *cors.headers],
                    allow_credentials=cors.credentials,
                    max_age=int(cors.max_age),
                )
            )
        logging.getLogger("uvicorn.error").addFilter(_QUIET_CUT)
        self._server = AsgiServer(
            CaptureSend(Starlette(routes=routes, middleware=middleware)),
            settings.host,
            settings.port,
            reuse_port=self.services.reuse_port,
            send_buffer=settings.send_buffer,
            unsent_limit=settings.unsent_limit,
        )
        if self._backplane is not None:
            self._follower = asyncio.create_task(self._follow())
        await self._server.start()
        # One watchdog and one heartbeat timer for all clients.
        self._timers = [
            asyncio.create_task(self._live.watch_stalls()),
            asyncio.create_task(self._live.beat(settings.heartbeat_interval)),
        ]
        logger.info(
            "connector %r listening on http://%s:%d%s",
            self.name,
            settings.host,
            self._server.port,
            path,
        )

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        self.services.hub.close_all("server shutting down")
        if self._server is not None:
            await self._server.stop()
            self._server = None

    # Publishing

    async def deliver(self, delivery: Delivery) -> None:
        stream = self._stream_of(delivery.operation)
        options = delivery.options
        event = options.event if isinstance(options, SseToOptions) else None

        if self._backplane is not None:
            await self._append_shared(stream, event, delivery)
            return

        # Encode once, with its id, for every subscriber and for replay.
        number = self._ids.last + 1
        try:
            encoded = encode_event(self._ids.format(number), event, delivery.payload)
        except (TypeError, ValueError) as exc:
            raise DeliveryError(
                f"the payload cannot be sent as JSON: {exc}", permanent=True
            ) from exc
        self._ids.next()
        message = Message(
            stream,
            delivery.input,
            delivery.payload,
            flow=delivery.flow,
            options=options,
        )
        message.cache["sse"] = encoded

        # Keep it for replay, then hand it to the live clients.
        history = self._histories.get(stream)
        if history is None:
            history = self._histories[stream] = History(
                self._settings.history_size, self._settings.history_ttl
            )
        history.append(Entry(number, time.monotonic(), message, delivery.filter))
        self.services.hub.publish(stream, message, delivery.filter)

    # Publishing in a cluster

    async def _append_shared(
        self, stream: str | None, event: str | None, delivery: Delivery
    ) -> None:
        """Append to the cluster's log; every process's follower delivers."""
        hub = self.services.hub
        assert isinstance(hub, ClusteredHub) and self._backplane is not None
        key = hub.key_for(delivery.flow, delivery.filter, delivery.options)
        if key is None:
            raise DeliveryError(
                f"flow {delivery.flow!r} is not a to block of this configuration",
                permanent=True,
            )
        try:
            encode_event("0", event, delivery.payload)  # refuse what SSE cannot send
            record = backplane_encode(
                {
                    "s": stream,
                    "e": event,
                    "i": delivery.input,
                    "p": delivery.payload,
                    "k": key,
                }
            )
        except (TypeError, ValueError) as exc:
            raise DeliveryError(
                f"the payload cannot be sent as JSON: {exc}", permanent=True
            ) from exc
        try:
            await self._backplane.history_append(
                self._log,
                record,
                self._settings.history_size * 16,
                self._settings.history_ttl,
            )
        except Exception as exc:  # the backplane's client raises assorted types
            raise DeliveryError(
                f"the cluster backplane refused the event: {exc}"
            ) from exc

    @property
    def _log(self) -> str:
        return f"sse:{self.name}"

    async def _follow(self) -> None:
        """Deliver and keep every event of the shared log, in log order."""
        assert self._backplane is not None
        hub = self.services.hub
        assert isinstance(hub, ClusteredHub)
        async for batch in self._backplane.history_follow(self._log, "0-0"):
            for entry_id, data in batch:
                number = _log_number(entry_id)
                if self._floor is None:
                    # Ids older than the first kept entry may have missed
                    # something that is gone: replay signals a gap for them.
                    self._floor = number
                try:
                    record = backplane_decode(data)
                    block = hub.block(record["k"])
                    encoded = encode_event(
                        self._ids.format(number), record["e"], record["p"]
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    logger.warning(
                        "connector %r: skipped log entry %s: %s",
                        self.name,
                        entry_id,
                        exc,
                    )
                    continue
                stream = record["s"]
                message = Message(
                    stream,
                    record["i"],
                    record["p"],
                    flow=block.flow,
                    options=block.options,
                )
                message.cache["sse"] = encoded
                history = self._histories.get(stream)
                if history is None:
                    history = self._histories[stream] = History(
                        self._settings.history_size, self._settings.history_ttl
                    )
                history.append(Entry(number, time.monotonic(), message, block.filter))
                self._ids.last = max(self._ids.last, number)
                hub.deliver(stream, message, block.filter)

    @staticmethod
    def _stream_of(operation: str) -> str | None:
        if operation == "broadcast":
            return None
        name = operation.removeprefix("stream:")
        if name == operation or not STREAM_NAME.fullmatch(name):
            raise DeliveryError(
                f"{operation!r} does not name a valid stream; {_STREAM_RULE}",
                permanent=True,
            )
        return name

    # Clients

    def subscriber_context(
        self,
        request: Request,
        stream: str | None,
        identity: Identity | None = None,
    ) -> dict[str, Any]:
        """The ``context`` that filters see for one client.

        ``params`` are the query parameters (the last value of a repeated
        one) and ``stream`` the stream name, or None on the broadcast path.
        Parameters are claims the client makes about itself, not identity:
        an ``auth`` block verifies a token first and passes its
        ``identity``, whose claims become ``context.user``; the token's
        query parameter is left out of ``params``.

        """
        params = dict(request.query_params)
        extra = {"stream": stream}
        if self._auth is not None:
            return self._auth.build_context(params, identity, extra)
        return build_context(params, identity, extra)

    async def _open(self, request: Request) -> Response:
        # Refuse what cannot be served before taking anything.
        limit = self._settings.max_query_length
        if len(request.scope.get("query_string", b"")) > limit:
            return _error(414, f"the query string is longer than {limit} bytes")
        stream: str | None = request.path_params.get("stream")
        if stream is not None:
            refusal = self._refuse_stream(stream)
            if refusal is not None:
                return refusal
        cors = self._settings.cors
        if cors is not None and not check_origin(
            request.headers.get("origin"), cors.origins
        ):
            return _error(403, "origin not allowed")
        identity: Identity | None = None
        if self._auth is not None:
            try:
                identity = self._auth.authenticate(
                    request.headers, request.query_params, request.cookies
                )
            except AuthError as exc:
                response = _error(exc.status, exc.reason)
                response.headers["WWW-Authenticate"] = exc.www_authenticate
                return response

        # Subscribe first, then read the history: nothing published in
        # between, since neither step waits, so no event is lost or doubled.
        context = self.subscriber_context(request, stream, identity)
        if (
            self._auth is not None
            and stream is not None
            and not self._auth.may_join(context, stream)
        ):
            return _error(403, f"not allowed to join {stream!r}")
        sub = self.services.hub.subscribe(
            context,
            () if stream is None else (stream,),
            queue_size=self._settings.send_queue,
            factory=functools.partial(SseClient, streams=self._live, stream=stream),
        )
        assert isinstance(sub, SseClient)
        if identity is not None and identity.expires_at is not None:
            sub.expiry = ExpiryTimer(lambda: sub.close(EXPIRED))
            sub.expiry.schedule(identity)
        head = self._head(stream, context, request.headers.get("last-event-id", ""))
        logger.debug(
            "connector %r: client %d on %s, %d events replayed",
            self.name,
            sub.id,
            stream or "broadcasts",
            len(head),
        )
        return EventStream(sub, head)

    def _refuse_stream(self, stream: str) -> Response | None:
        if not STREAM_NAME.fullmatch(stream):
            return _error(400, f"invalid stream name {stream[:200]!r}; {_STREAM_RULE}")
        if not self._any_stream and stream not in self._streams:
            return _error(404, f"no flow publishes to stream {stream!r}")
        return None

    def _head(
        self, stream: str | None, context: dict[str, Any], last_event_id: str
    ) -> list[bytes]:
        """What a client gets before live events: retry hint, gap, replay."""
        head: list[bytes] = []
        if self._settings.retry is not None:
            head.append(f"retry: {round(self._settings.retry * 1000)}\n\n".encode())
        if not last_event_id:
            return head
        number = self._ids.parse(last_event_id)
        if number is None:
            head.append(encode_gap(last_event_id, "unknown"))
        keys = (None,) if stream is None else (stream, None)
        histories = [self._histories[key] for key in keys if key in self._histories]
        found = replay(histories, number or 0, context)
        older = number is not None and self._floor is not None and number < self._floor
        if (found.gap or older) and number is not None:
            head.append(encode_gap(last_event_id, "expired"))
        head.extend(entry.message.cache["sse"] for entry in found.entries)
        for flow, (sent, filtered, failed) in found.counts.items():
            self.services.metrics.fan_out(flow, self.name, sent, filtered, failed)
        return head


class _AnyText(Convertor[str]):
    """A path segment of any characters, newlines included.

    Starlette's ``path`` convertor is ``.*``, which stops at a newline, so
    ``/events/a%0Ab`` would be a 404 from the router instead of this
    connector's own 400 for an invalid stream name.

    """

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("mycel_sse_any", _AnyText())


def _log_number(entry_id: str) -> int:
    """A log entry's position as one number: ``"1700000000000-3"`` ->
    1700000000000000003, increasing along the log."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) * 1_000_000 + int(seq or 0)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
