"""Starting and stopping everything a configuration declares.

Start-up: create every connector, bind every flow to its source, start the
connectors (connect, listen), start the admin endpoint, then start the
sources. Shutdown reverses it: stop the sources, wait for in-flight events
(up to ``service.shutdown_timeout``) so that at-least-once sources can
acknowledge what finished, then close every connector.

"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from ._admin import AdminServer
from ._cluster import Backplane, ClusteredHub, ToBlock
from ._config import Config
from ._connector import Connector, Services, SourceBinding
from ._engine import FlowHandle, InFlight
from ._expr import Expression, Template
from ._hub import Hub
from ._metrics import Metrics
from ._settings import redact_url
from .errors import ConnectorError

__all__ = ["Runtime"]

logger = logging.getLogger("mycel.run")


class Runtime:
    """The running form of a :class:`~mycel.Config`.

    Use as ``async with Runtime(config):`` or call :meth:`start` and
    :meth:`stop`. ``hub_factory`` builds the fan-out hub of a connector; the
    default is a local :class:`Hub`.

    """

    def __init__(
        self,
        config: Config,
        *,
        hub_factory: Callable[[str, Metrics], Hub] | None = None,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.in_flight = InFlight(self.metrics)
        self.ready = False
        self.worker = worker
        self.backplane: Backplane | None = None
        cluster = config.cluster
        if cluster is not None:
            scheme = cluster.backplane.split("://", 1)[0]
            self.backplane = config.registry.backplanes[scheme](
                cluster.backplane, cluster.namespace
            )
        self._hub_factory = hub_factory or self._default_hub
        self._hubs: dict[str, Hub] = {}
        self._admin: AdminServer | None = None
        self._started: list[Connector] = []
        functions = config.registry.functions

        # One instance per connector block.
        self.connectors: dict[str, Connector] = {}
        for name, spec in config.connectors.items():
            services = Services(
                name=name,
                metrics=self.metrics,
                hub_factory=functools.partial(self._hub_for, name),
                compile_expression=functools.partial(Expression, functions=functions),
                compile_template=functools.partial(Template, functions=functions),
                logger=logging.getLogger(f"mycel.{spec.type}"),
                base_dir=config.base_dir,
                backplane=self.backplane,
                worker=worker,
            )
            self.connectors[name] = spec.cls(name, spec.settings, services)

        # Bind every flow to its source, and tell hubs which filters to index.
        self.flows: dict[str, FlowHandle] = {}
        self._fan_out_blocks: dict[str, dict[str, ToBlock]] = {}
        for name, flow in config.flows.items():
            for index, to in enumerate(flow.to):
                if to.fan_out:
                    key = f"{name}#{index}"
                    self._fan_out_blocks.setdefault(to.connector, {})[key] = ToBlock(
                        key, name, to.filter, to.options
                    )
        # Fan-out connectors get their hub now, so that a cluster attaches
        # it to the backplane at start even if nothing touched it yet.
        for name, connector in self.connectors.items():
            if connector.fan_out:
                self._hub_for(name)
        for name, flow in config.flows.items():
            handle = FlowHandle(flow, self.connectors, self.metrics, self.in_flight)
            self.flows[name] = handle
            source = self.connectors[flow.source.connector]
            source.bind_source(
                SourceBinding(name, flow.source.operation, flow.source.options, handle)
            )
            for to in flow.to:
                self.connectors[to.connector].bind_target(
                    to.operation.source, to.options
                )
                if to.fan_out and to.filter is not None and to.filter.indexed:
                    hub = self.connectors[to.connector].services.hub
                    hub.add_index(to.filter.indexed.context_path)

    def _default_hub(self, name: str, metrics: Metrics) -> Hub:
        if self.backplane is None:
            return Hub(name, metrics)
        assert self.config.cluster is not None
        return ClusteredHub(
            name,
            metrics,
            self.backplane,
            self._fan_out_blocks.get(name, {}),
            self.config.cluster.buffer,
        )

    def _hub_for(self, name: str) -> Hub:
        hub = self._hubs.get(name)
        if hub is None:
            hub = self._hubs[name] = self._hub_factory(name, self.metrics)
            self.metrics.track_queue_depth(name, hub.queue_depth)
        return hub

    def connector(self, name: str) -> Connector:
        return self.connectors[name]

    async def start(self) -> None:
        """Start every connector, the admin endpoint, then the sources.

        If anything fails to start, what did start is closed again and the
        error is raised.

        """
        try:
            if self.backplane is not None:
                await self._connect_backplane()
            for name, connector in self.connectors.items():
                logger.debug("starting connector %r", name)
                await connector.start()
                self._started.append(connector)
            for hub in self._hubs.values():
                if isinstance(hub, ClusteredHub):
                    await hub.attach()
            port = self.config.service.admin_port
            if port is not None and self.worker is not None:
                port += self.worker
            if port is not None:
                self._admin = AdminServer(self, self.config.service.admin_host, port)
                await self._admin.start()
                logger.info(
                    "admin endpoint on http://%s:%d/ (health, ready, metrics)",
                    self.config.service.admin_host,
                    self._admin.port,
                )
            for connector in self._started:
                await connector.start_sources()
        except BaseException:
            await self._close_started()
            raise
        self.ready = True
        logger.info(
            "%s started: %d connectors, %d flows",
            self.config.service.name,
            len(self.connectors),
            len(self.flows),
        )

    async def _connect_backplane(self) -> None:
        assert self.backplane is not None
        try:
            await self.backplane.connect()
        except Exception as exc:  # the engine's client raises assorted types
            raise ConnectorError(
                f"cannot reach the cluster backplane {redact_url(self.backplane.url)}: "
                f"{exc}"
            ) from exc
        logger.info("cluster backplane %s connected", redact_url(self.backplane.url))

    async def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop; returns False if in-flight events were abandoned."""
        self.ready = False
        timeout = self.config.service.shutdown_timeout if timeout is None else timeout

        # Stop intake first so that the drain below can finish.
        results = await asyncio.gather(
            *(c.stop_sources() for c in self._started), return_exceptions=True
        )
        self._log_failures("stopping sources of", results)

        drained = await self.in_flight.wait_idle(timeout)
        if not drained:
            logger.warning(
                "shutdown: %d events still in flight after %.1fs; they will be "
                "redelivered by at-least-once sources",
                self.in_flight.count,
                timeout,
            )
        await self._close_started()
        logger.info("%s stopped", self.config.service.name)
        return drained

    async def _close_started(self) -> None:
        for hub in self._hubs.values():
            if isinstance(hub, ClusteredHub):
                await hub.detach()
            hub.close_all("server shutting down")
        results = await asyncio.gather(
            *(c.close() for c in reversed(self._started)), return_exceptions=True
        )
        self._log_failures("closing", results)
        self._started.clear()
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        if self.backplane is not None:
            try:
                await self.backplane.close()
            except Exception as exc:  # the engine's client raises assorted types
                logger.warning("closing the cluster backplane failed: %s", exc)

    def _log_failures(self, what: str, results: list[Any]) -> None:
        for connector, result in zip(self._started, results, strict=False):
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                logger.error(
                    "%s connector %r failed", what, connector.name, exc_info=result
                )

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin is not None else None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
