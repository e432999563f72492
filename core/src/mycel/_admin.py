"""The admin endpoint: ``/health``, ``/ready`` and ``/metrics``.

``/health`` answers 200 while the process runs; ``/ready`` answers 200 once
every connector started and 503 before that and during shutdown;
``/metrics`` serves the runtime's Prometheus metrics.

"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._asgi import AsgiServer

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self.runtime = runtime

        async def health(request: Request) -> Response:
            return JSONResponse(
                {"status": "ok", "service": runtime.config.service.name}
            )

        async def ready(request: Request) -> Response:
            if runtime.ready:
                return JSONResponse({"status": "ready"})
            return JSONResponse({"status": "not ready"}, status_code=503)

        async def metrics(request: Request) -> Response:
            return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        app = Starlette(
            routes=[
                Route("/health", health),
                Route("/ready", ready),
                Route("/metrics", metrics),
            ]
        )
        self._server = AsgiServer(app, host, port)

    @property
    def port(self) -> int:
        return self._server.port

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()
