"""What a connector is, to the runtime and to a plugin author.

A connector type is a subclass of :class:`Connector` that states, as class
attributes, its type name, its settings model and the operations it offers
as a source and as a target. The runtime creates one instance per
``connector`` block, binds the flows that read from it, and calls its
lifecycle methods in this order::

    start()           connect, listen; no events are handed to flows yet
    start_sources()   begin handing events to the bound flows
    ... deliver() (or deliver_many()) for every ``to`` that names it ...
    stop_sources()    stop taking new events; in-flight ones still finish
    close()           after in-flight events drained: close everything

"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ._settings import Settings
from .errors import ConnectorError

if TYPE_CHECKING:
    from ._cluster import Backplane
    from ._engine import FlowHandle
    from ._expr import Expression, IndexedEquality, Template
    from ._hub import Hub
    from ._metrics import Metrics

__all__ = [
    "Connector",
    "Delivery",
    "Event",
    "Filter",
    "Operation",
    "Services",
    "SourceBinding",
]


@dataclass(frozen=True)
class Operation:
    """One operation a connector offers, as a pattern users can read.

    ``pattern`` is shown to users (``"room:NAME"``); ``regex`` is what a
    written operation must fully match, after ``${...}`` templates have been
    replaced by a placeholder. Without ``regex`` the pattern is literal.

    """

    pattern: str
    description: str
    regex: str | None = None

    def matches(self, operation: str) -> bool:
        if self.regex is None:
            return operation == self.pattern
        return re.fullmatch(self.regex, operation) is not None


@dataclass(slots=True)
class Event:
    """One event a source hands to a flow.

    ``input`` is the payload as the source produced it. ``context`` carries
    what is known about where it came from (the sending WebSocket
    connection, the RabbitMQ envelope); expressions see it as ``context``.

    """

    input: Any
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Filter:
    """A ``to`` block's filter, ready for per-subscriber evaluation.

    ``indexed`` is set when the filter is an equality between an event field
    and a subscriber's context (``input.user_id == context.params.user_id``):
    the hub then finds the matching subscribers by lookup.

    """

    expression: Expression
    indexed: IndexedEquality | None = None


@dataclass(slots=True)
class Delivery:
    """One event going out through one ``to`` block.

    ``operation`` and ``target`` are already rendered from their templates.
    ``payload`` is what the flow delivers (the transform result, or the
    input). ``filter`` is set only for fan-out connectors, which evaluate it
    per subscriber; for others the engine has already applied it.

    """

    flow: str
    operation: str
    target: str | None
    input: Any
    payload: Any
    context: Mapping[str, Any]
    filter: Filter | None = None
    options: Settings | None = None


@dataclass
class SourceBinding:
    """A flow that reads from a source connector.

    ``operation`` is the ``from`` block's operation as written; ``options``
    the parsed extra attributes of the ``from`` block (see
    :attr:`Connector.from_options`); ``handle`` runs the flow for an event.

    """

    flow: str
    operation: str
    options: Settings | None
    handle: FlowHandle


class Services:
    """What the runtime lends a connector: its name, logger, metrics, hub.

    A plugin never builds one itself; ``mycel.testing`` does for tests.

    """

    def __init__(
        self,
        name: str,
        metrics: Metrics,
        hub_factory: Callable[[], Hub],
        compile_expression: Callable[[str], Expression],
        compile_template: Callable[[str], Template],
        logger: logging.Logger,
        base_dir: Path | None = None,
        backplane: Backplane | None = None,
        worker: int | None = None,
    ) -> None:
        self.name = name
        self.base_dir = base_dir or Path.cwd()
        """The configuration directory: relative paths in settings start here."""
        self.backplane = backplane
        """The cluster's shared engine, or None without a cluster block."""
        self.worker = worker
        """This process's index under ``mycel run --workers N``, else None."""
        self.metrics = metrics
        self._hub_factory = hub_factory
        self._hub: Hub | None = None
        self.compile_expression = compile_expression
        self.compile_template = compile_template
        self.logger = logger

    @property
    def reuse_port(self) -> bool:
        """Listen with SO_REUSEPORT: several workers share each port."""
        return self.worker is not None

    @property
    def hub(self) -> Hub:
        """This connector's fan-out hub, created on first use."""
        if self._hub is None:
            self._hub = self._hub_factory()
        return self._hub


class Connector:
    """Base class of every connector type.

    Subclasses set the class attributes below and override the lifecycle
    methods they need. ``__init__`` must not do I/O: it runs for
    ``mycel validate`` too.

    """

    type_name: ClassVar[str] = ""
    """The ``type = "..."`` this class implements."""

    settings_model: ClassVar[type[Settings]] = Settings
    """The model the ``connector`` block's attributes are validated against."""

    source_operations: ClassVar[Sequence[Operation]] = ()
    """Operations a ``from`` block may name; empty: not a source."""

    target_operations: ClassVar[Sequence[Operation]] = ()
    """Operations a ``to`` block may name; empty: not a target."""

    default_operation: ClassVar[str | None] = None
    """The target operation used when a ``to`` block gives none."""

    target_required: ClassVar[bool] = False
    """Whether a ``to`` block must give ``target`` (a routing key, a table)."""

    from_options: ClassVar[type[Settings] | None] = None
    """Extra attributes a ``from`` block may carry, or None for none."""

    to_options: ClassVar[type[Settings] | None] = None
    """Extra attributes a ``to`` block may carry, or None for none."""

    fan_out: ClassVar[bool] = False
    """True when deliveries go to subscribers and filters run per subscriber."""

    ordered: ClassVar[bool] = False
    """True when the source hands events one at a time, in order.

    A statement about the source, which keeps the order itself by awaiting
    each ``handle.process`` before the next; the flow's ``concurrency``
    does not apply to it. The runtime does not act on it.
    """

    def __init__(self, name: str, settings: Settings, services: Services) -> None:
        self.name = name
        self.settings = settings
        self.services = services
        self.bindings: list[SourceBinding] = []

    @classmethod
    def check_binding(
        cls,
        settings: Settings,
        role: Literal["source", "target"],
        operation: str,
        options: Settings | None,
    ) -> list[str]:
        """Further checks of one ``from`` or ``to`` against the settings.

        Return one message per problem (lowercase, no final period); the
        loader adds file and line. Called at load time, before anything
        starts. The default finds nothing wrong.

        """
        return []

    @classmethod
    def check_target(cls, settings: Settings, target: str) -> list[str]:
        """Check a ``to`` block's ``target`` at load time.

        ``target`` is as written, with each ``${...}`` template replaced by
        ``x``: a table name, an index, a routing key. Return one message per
        problem (lowercase, no final period). The default finds nothing
        wrong; a template's rendered value is still the connector's to check
        per event.

        """
        return []

    def bind_source(self, binding: SourceBinding) -> None:
        """Attach a flow that reads from this connector (before start)."""
        self.bindings.append(binding)

    def bind_target(self, operation: str, options: Settings | None) -> None:
        """Learn of a ``to`` block that names this connector (before start).

        ``operation`` is the operation as written, ``${...}`` templates
        included. Called once per ``to`` block; a GraphQL server uses it to
        build its subscription fields. The default does nothing.

        """

    async def start(self) -> None:
        """Connect and listen. Runs before any source is started."""

    async def start_sources(self) -> None:
        """Begin handing events to the bound flows."""

    async def stop_sources(self) -> None:
        """Stop taking new events; events in flight still finish."""

    async def close(self) -> None:
        """Release everything; in-flight events have drained by now."""

    async def deliver(self, delivery: Delivery) -> None:
        """Deliver one event for a ``to`` block; raise to fail it.

        Raise :class:`mycel.DeliveryError` (``permanent=True`` when a retry
        cannot help). Returning means the event was delivered: for a durable
        target, that it was committed or confirmed.

        """
        raise ConnectorError(f"connector {self.name!r} is not a target")

    async def deliver_many(
        self, deliveries: Sequence[Delivery]
    ) -> list[BaseException | None]:
        """Deliver several events at once; one outcome per delivery.

        Called by the engine when a source hands a flow several ready events
        at once (:meth:`FlowHandle.process_many`) and the flow evaluates
        nothing per event. ``deliveries`` are in the order the source took
        the events; an override applies them in that order, since an
        ordered source (CDC) hands batches only to a target that overrides
        this, and relies on it. Return a list as long as ``deliveries``:
        None where the delivery succeeded (with the same meaning as
        :meth:`deliver` returning: committed, for a durable target), else
        the exception :meth:`deliver` would have raised for it, a
        :class:`mycel.DeliveryError` as a rule. One delivery's failure must
        not fail the others; the engine retries only those that failed, one
        by one through :meth:`deliver`.

        Do not raise for a delivery's failure. An exception that escapes
        (other than cancellation) is taken for a connector bug: it is logged
        and every delivery of the call is retried through :meth:`deliver`.

        The default calls :meth:`deliver` for each delivery concurrently, so
        every target supports it; they start in order but may finish in any
        order. Override it when the target can do better with many events
        in one go (one transaction, one request): the ``database`` target
        writes each batch of rows with one commit.

        """
        if len(deliveries) == 1:
            try:
                await self.deliver(deliveries[0])
            except Exception as exc:  # the outcome of that one delivery
                return [exc]
            return [None]
        results = await asyncio.gather(
            *(self.deliver(delivery) for delivery in deliveries),
            return_exceptions=True,
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    def describe(self) -> Mapping[str, Any]:
        """Settings as shown to users, secrets masked (for logs and lists)."""
        from ._settings import shown_value

        return {
            key: shown_value(key, value)
            for key, value in self.settings.model_dump().items()
        }
