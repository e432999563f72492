"""The server driver: an ASGI app serving GraphQL over HTTP and WebSocket.

HTTP (``path``): queries and introspection by POST (JSON body) or GET
(``?query=``), and the GraphiQL IDE for a browser when ``playground`` is on.
WebSocket (``subscriptions.path``, default ``path``): subscriptions in
either subprotocol, see :mod:`mycel_graphql._protocol`, over uvicorn's
sans-I/O WebSocket protocol with a direct way in for subscription frames
(:mod:`mycel_graphql._frames`).

"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, MutableMapping
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

import mycel

from ._frames import FrameProtocol, write_batch
from ._protocol import Connection, Receive, Send, choose_subprotocol
from ._schema import SchemaBuilder, ServedSchema
from ._settings import GraphqlSettings

__all__ = ["GraphqlServer"]

logger = logging.getLogger("mycel.graphql")


class GraphqlServer:
    """The server half of a ``graphql`` connector."""

    def __init__(
        self, name: str, settings: GraphqlSettings, services: mycel.Services
    ) -> None:
        self.name = name
        self.settings = settings
        self.services = services
        self.fields: list[str] = []
        self.served: ServedSchema | None = None
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: mycel.AsgiServer | None = None
        self.auth: mycel.Authenticator | None = None
        self.batch = write_batch()
        """Connections with subscription frames to write; see ``_frames``."""

    @property
    def hub(self) -> mycel.Hub:
        return self.services.hub

    @property
    def port(self) -> int:
        return self._server.port if self._server else self.settings.port

    def bind_target(self, operation: str) -> None:
        field = operation.removeprefix("Subscription.")
        if field not in self.fields:
            self.fields.append(field)

    async def start(self) -> None:
        if self.settings.auth is not None:
            # Keys load here: an unreadable key file stops start-up.
            self.auth = mycel.Authenticator(
                self.settings.auth, base_dir=self.services.base_dir
            )
        # Build the schema first: a bad schema file must stop start-up.
        schema_file = None
        if self.settings.schema_file is not None:
            schema_file = Path(self.services.base_dir, self.settings.schema_file)
        self.served = SchemaBuilder(self.fields, schema_file).build()
        unbound = sorted(set(self.served.subscription_fields) - set(self.fields))
        if schema_file is not None and unbound:
            logger.warning(
                "connector %r: no flow publishes to Subscription field(s) %s; "
                "their subscribers will get nothing",
                self.name,
                ", ".join(unbound),
            )

        self._server = mycel.AsgiServer(
            self.app,
            self.settings.host,
            self.settings.port,
            interface="asgi3",
            ws=FrameProtocol,
            reuse_port=self.services.reuse_port,
            send_buffer=self.settings.send_buffer,
            unsent_limit=self.settings.unsent_limit,
        )
        await self._server.start()
        host, port = self.settings.host, self._server.port
        logger.info(
            "connector %r serving GraphQL on http://%s:%d%s, subscriptions on "
            "ws://%s:%d%s",
            self.name,
            host,
            port,
            self.settings.path,
            host,
            port,
            self.settings.ws_path,
        )

    async def close(self) -> None:
        for connection in list(self.connections):
            await connection.close(1001, "Going away")
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def deliver(self, delivery: mycel.Delivery) -> None:
        assert self.served is not None, "deliver() before start()"
        field = delivery.operation.removeprefix("Subscription.")
        problem = self.served.check_payload(field, delivery.payload)
        if problem is not None:
            raise mycel.DeliveryError(
                f"payload does not match the schema: {problem}", permanent=True
            )
        message = mycel.Message(
            field, delivery.input, delivery.payload, flow=delivery.flow
        )
        self.hub.publish(field, message, delivery.filter)

    # The ASGI application

    async def app(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send
    ) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket":
            if path == self.settings.ws_path and self.settings.subscriptions.enabled:
                await self._websocket(scope, receive, send)
            else:
                await send(
                    {"type": "websocket.close", "code": 1008, "reason": "no such path"}
                )
            return
        if scope["type"] != "http":
            return
        if path != self.settings.path:
            response: Response = PlainTextResponse("Not Found", status_code=404)
        else:
            response = await self._http(Request(scope, receive))
        await response(scope, receive, send)

    async def _websocket(
        self, scope: Mapping[str, Any], receive: Receive, send: Send
    ) -> None:
        # Answer the handshake with the best subprotocol offered.
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        headers = _headers(scope)
        origins = self.settings.allowed_origins
        if origins is not None and not mycel.check_origin(
            headers.get("origin"), origins
        ):
            logger.info(
                "refused a WebSocket from %s: origin %r is not allowed",
                scope.get("client"),
                headers.get("origin"),
            )
            await _deny(scope, send, 403, "origin not allowed")
            return
        try:
            identity = self._handshake_identity(scope, headers)
        except mycel.AuthError as exc:
            logger.info(
                "refused a WebSocket from %s: %s", scope.get("client"), exc.reason
            )
            await _deny(
                scope,
                send,
                exc.status,
                exc.reason,
                {"www-authenticate": exc.www_authenticate},
            )
            return
        offered = [p.strip() for p in scope.get("subprotocols", ())]
        protocol = choose_subprotocol(offered)
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if protocol is not None:
            accept["subprotocol"] = protocol
        await send(accept)
        if protocol is None:
            await send(
                {
                    "type": "websocket.close",
                    "code": 4406,
                    "reason": "Subprotocol not acceptable",
                }
            )
            return

        assert self.served is not None
        connection = Connection(
            self,
            self.settings,
            scope=scope,
            receive=receive,
            send=send,
            protocol=protocol,
            auth=self.auth,
            identity=identity,
        )
        self.connections.add(connection)
        task = connection.task = asyncio.create_task(connection.run())
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                task.cancel()
                raise
            # Aborted: a slow consumer that took not even its close frame.
        finally:
            self.connections.discard(connection)

    def _handshake_identity(
        self, scope: Mapping[str, Any], headers: Mapping[str, str]
    ) -> mycel.Identity | None:
        """Who the client is by its handshake; None: decide at connection_init.

        A token in the header, cookie or query string must verify (else
        :class:`mycel.AuthError`, answered with HTTP 401). Without one, the
        ``connection_init`` payload may still bring it, unless the settings
        read no payload key at all.

        """
        if self.auth is None:
            return mycel.ANONYMOUS
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        cookies = _cookies(headers.get("cookie"))
        settings = self.auth.settings
        from_payload = settings.connection_param is not None or settings.header
        if from_payload and self.auth.token_from(headers, query, cookies) is None:
            return None
        return self.auth.authenticate(headers, query, cookies)

    async def _http(self, request: Request) -> Response:
        # The IDE for a browser asking for a page.
        accept = request.headers.get("accept", "")
        if request.method == "GET" and "query" not in request.query_params:
            if self.settings.playground and "text/html" in accept:
                return HTMLResponse(self._ide_html())
            return _errors(400, "send a query: POST a JSON body or GET ?query=")

        # Read the request as GraphQL over HTTP describes it.
        if request.method == "POST":
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                return _errors(400, f"the body is not valid JSON: {exc}")
            if not isinstance(body, dict):
                return _errors(400, "the body must be a JSON object")
        elif request.method == "GET":
            body = dict(request.query_params)
            if "variables" in body:
                try:
                    body["variables"] = json.loads(body["variables"])
                except ValueError as exc:
                    return _errors(400, f"variables are not valid JSON: {exc}")
        else:
            return _errors(405, "use GET or POST")
        query = body.get("query")
        variables = body.get("variables")
        operation_name = body.get("operationName")
        if (
            not isinstance(query, str)
            or not isinstance(variables, dict | type(None))
            or not isinstance(operation_name, str | type(None))
        ):
            return _errors(400, "'query' must be a string, 'variables' an object")

        assert self.served is not None
        plan = self.served.plan(query, operation_name, variables)
        if isinstance(plan, list):
            return JSONResponse({"errors": plan}, status_code=400)
        if plan.field is not None:
            return _errors(
                400,
                f"subscriptions are served over WebSocket on {self.settings.ws_path}",
            )
        return JSONResponse(plan.execute_once())

    def _ide_html(self) -> str:
        from strawberry.http.ides import get_graphql_ide_html

        html = get_graphql_ide_html("graphiql")
        # Point the IDE's subscriptions at our WebSocket path.
        ws_url = (
            "(() => { const u = new URL(fetchURL); "
            "u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:'; "
            f"u.pathname = {json.dumps(self.settings.ws_path)}; "
            "return u.toString(); })()"
        )
        return html.replace(
            "const subscriptionUrl = httpUrlToWebSockeUrl(fetchURL);",
            f"const subscriptionUrl = {ws_url};",
        )


def _headers(scope: Mapping[str, Any]) -> dict[str, str]:
    return {
        k.decode("latin-1").lower(): v.decode("latin-1")
        for k, v in scope.get("headers", ())
    }


def _cookies(header: str | None) -> dict[str, str]:
    if not header:
        return {}
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


async def _deny(
    scope: Mapping[str, Any],
    send: Send,
    status: int,
    reason: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Refuse a WebSocket handshake with an HTTP answer, before the upgrade."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        # Without the denial extension the server answers 403 by itself.
        await send({"type": "websocket.close", "code": 1008, "reason": reason})
        return
    body = reason.encode()
    raw = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in (headers or {}).items()
        ),
    ]
    await send(
        {"type": "websocket.http.response.start", "status": status, "headers": raw}
    )
    await send({"type": "websocket.http.response.body", "body": body})


def _errors(status: int, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message}]}, status_code=status)
