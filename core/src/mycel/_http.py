"""The built-in ``http`` connector: inject events over HTTP, serve files.

As a source, ``operation = "POST /orders"`` turns each request with a JSON
body into an event whose ``input`` is the body and whose ``context`` holds
``params`` (query parameters), ``method``, ``path`` and ``headers``
(lowercase names, without Authorization and Cookie). The answer is:

- 202 ``{"status": "accepted"}`` once the flow finished with the event;
- 400 with a reason when the body is not JSON;
- 413 when the body is larger than ``max_body_size``;
- 502 with the flow's error when the flow gave up on the event;
- 503 while the process starts or shuts down.

With ``static_dir`` set it also serves that folder (relative to the
configuration directory) under ``static_path``, for demo pages.

"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ._asgi import AsgiServer
from ._connector import Connector, Event, Operation, SourceBinding
from ._settings import Settings
from .errors import ConnectorError, FlowError

__all__ = ["HttpConnector", "HttpSettings"]

logger = logging.getLogger("mycel.http")

_HIDDEN_HEADERS = {"authorization", "cookie", "proxy-authorization"}


class HttpSettings(Settings):
    """Settings of ``type = "http"``."""

    host: str = "127.0.0.1"
    """Address to listen on."""

    port: int = Field(default=8080, ge=0, le=65535)
    """Port to listen on (0: any free port)."""

    max_body_size: int = Field(default=1_048_576, ge=1)
    """Largest request body accepted, in bytes; larger ones get 413."""

    static_dir: str | None = None
    """A folder to serve as static files, relative to the configuration."""

    static_path: str = "/"
    """URL path the static folder is served under."""


class HttpConnector(Connector):
    """Events from HTTP requests; see the module docstring."""

    type_name = "http"
    settings_model = HttpSettings
    source_operations = (
        Operation(
            "METHOD /PATH",
            "requests with a JSON body, e.g. POST /orders",
            r"(POST|PUT|PATCH|DELETE) /[A-Za-z0-9_\-./{}]*",
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, HttpSettings)
        self._settings: HttpSettings = self.settings
        self._accepting = False
        self._server: AsgiServer | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (useful with ``port = 0``)."""
        return self._server.port if self._server else self._settings.port

    def _route(self, binding: SourceBinding) -> Route:
        method, path = binding.operation.split(" ", 1)

        async def endpoint(request: Request) -> Response:
            return await self._handle(binding, request)

        return Route(path, endpoint, methods=[method])

    async def _handle(self, binding: SourceBinding, request: Request) -> Response:
        if not self._accepting:
            return JSONResponse({"error": "not accepting events"}, status_code=503)

        # Read the body without ever holding more than the limit.
        limit = self._settings.max_body_size
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _too_large(limit)

        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return JSONResponse(
                {"error": f"the body is not valid JSON: {exc}"}, status_code=400
            )

        context = {
            "params": dict(request.query_params),
            "method": request.method,
            "path": request.url.path,
            "headers": {
                k: v for k, v in request.headers.items() if k not in _HIDDEN_HEADERS
            },
        }
        try:
            await binding.handle.process(Event(payload, context))
        except FlowError as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        return JSONResponse({"status": "accepted"}, status_code=202)

    async def start(self) -> None:
        routes: list[BaseRoute] = [self._route(b) for b in self.bindings]
        if self._settings.static_dir is not None:
            folder = Path(self.services.base_dir, self._settings.static_dir)
            if not folder.is_dir():
                raise ConnectorError(
                    f"connector {self.name!r}: static_dir {str(folder)!r} "
                    "is not a folder"
                )
            routes.append(
                Mount(
                    self._settings.static_path, StaticFiles(directory=folder, html=True)
                )
            )
        self._server = AsgiServer(
            Starlette(routes=routes),
            self._settings.host,
            self._settings.port,
            reuse_port=self.services.reuse_port,
        )
        await self._server.start()
        logger.info(
            "connector %r listening on http://%s:%d/",
            self.name,
            self._settings.host,
            self._server.port,
        )

    async def start_sources(self) -> None:
        self._accepting = True

    async def stop_sources(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None


def _too_large(limit: int) -> Response:
    return JSONResponse(
        {"error": f"the body is larger than {limit} bytes"}, status_code=413
    )
