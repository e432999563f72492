"""Running one flow for one event: transform, filter, deliver, retry.

A source hands each event to :meth:`FlowHandle.process` and learns its
outcome: it returns when every ``to`` block succeeded (or was filtered out),
and raises :class:`~mycel.errors.FlowError` when the flow gave up. An
at-least-once source acknowledges only what returned, and applies its
dead-letter policy to what raised.

Each ``to`` block is tried up to ``retry.attempts`` times with capped
exponential backoff; a retry only repeats the ``to`` blocks that failed, so
a target that already succeeded is not sent the event twice. A transform or
template that cannot be evaluated on this event fails it at once and
``permanent``: trying again would give the same result.

"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._connector import Connector, Delivery, Event
from .errors import DeliveryError, ExpressionError, FlowError

if TYPE_CHECKING:
    from ._config import FlowConfig, ToConfig
    from ._metrics import Metrics
    from ._settings import Settings

__all__ = ["FlowHandle", "InFlight"]

logger = logging.getLogger("mycel.flow")


class InFlight:
    """Counts events being processed, so that shutdown can wait for them."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        if metrics is not None:
            metrics.in_flight.set_function(lambda: self.count)

    def enter(self) -> None:
        if self.count == 0:
            self._idle.clear()
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if the timeout ran out."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class _Target:
    """One ``to`` block bound to its connector."""

    __slots__ = ("config", "connector", "label")

    def __init__(self, config: ToConfig, connector: Connector) -> None:
        self.config = config
        self.connector = connector
        self.label = connector.name


class FlowHandle:
    """Runs one flow; handed to its source connector in a SourceBinding."""

    def __init__(
        self,
        flow: FlowConfig,
        targets: Mapping[str, Connector],
        metrics: Metrics,
        in_flight: InFlight,
    ) -> None:
        self.flow = flow.name
        self.operation = flow.source.operation
        self.options: Settings | None = flow.source.options
        self.concurrency = flow.concurrency
        self.retry = flow.retry
        self._transform = flow.transform
        self._targets = [_Target(to, targets[to.connector]) for to in flow.to]
        self._metrics = metrics
        self._events_in = metrics.events_in.cell(flow.name)
        self._events_out = {
            t.label: metrics.events_out.cell(flow.name, t.label) for t in self._targets
        }
        self._in_flight = in_flight

    async def process(self, event: Event) -> None:
        """Run the flow for ``event``; raise FlowError if it gave up."""
        self._events_in[0] += 1
        self._in_flight.enter()
        try:
            await self._process(event)
        except FlowError:
            self._metrics.events_failed.labels(self.flow).inc()
            raise
        finally:
            self._in_flight.leave()

    async def _process(self, event: Event) -> None:
        # Transform once per event; the same payload goes to every target.
        payload = self._apply_transform(event)
        variables = {"input": event.input, "output": payload, "context": event.context}

        # Decide which to blocks run and render their templates.
        deliveries: list[tuple[_Target, Delivery]] = []
        for target in self._targets:
            delivery = self._prepare(target, event, payload, variables)
            if delivery is not None:
                deliveries.append((target, delivery))

        if len(deliveries) == 1:
            await self._deliver(*deliveries[0])
            return
        results = await asyncio.gather(
            *(self._deliver(t, d) for t, d in deliveries), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, FlowError):
                raise failure
        if failures:
            assert isinstance(failures[0], FlowError)
            raise FlowError(
                self.flow,
                "; ".join(f.reason for f in failures if isinstance(f, FlowError)),
                permanent=all(
                    isinstance(f, FlowError) and f.permanent for f in failures
                ),
            )

    def _apply_transform(self, event: Event) -> Any:
        if not self._transform:
            return event.input
        output: dict[str, Any] = {}
        variables = {"input": event.input, "output": output, "context": event.context}
        for name, expression in self._transform:
            try:
                output[name] = expression.evaluate(variables)
            except ExpressionError as exc:
                raise FlowError(
                    self.flow, f"transform field {name!r} failed: {exc}", permanent=True
                ) from exc
        return output

    def _prepare(
        self,
        target: _Target,
        event: Event,
        payload: Any,
        variables: Mapping[str, Any],
    ) -> Delivery | None:
        to = target.config
        if to.filter is not None and not to.fan_out:
            try:
                passed = to.filter.expression.evaluate(variables) is True
            except ExpressionError as exc:
                logger.debug("flow %r: filter failed: %s", self.flow, exc)
                self._metrics.filter_errors.labels(self.flow, target.label).inc()
                passed = False
            if not passed:
                self._metrics.filtered.labels(self.flow, target.label).inc()
                return None
        try:
            operation = to.operation.render(variables)
            rendered_target = to.target.render(variables) if to.target else None
        except ExpressionError as exc:
            raise FlowError(
                self.flow, f"to {target.label!r}: {exc}", permanent=True
            ) from exc
        return Delivery(
            flow=self.flow,
            operation=operation,
            target=rendered_target,
            input=event.input,
            payload=payload,
            context=event.context,
            filter=to.filter if to.fan_out else None,
            options=to.options,
        )

    async def _deliver(self, target: _Target, delivery: Delivery) -> None:
        retry = self.retry
        attempt = 1
        while True:
            try:
                await target.connector.deliver(delivery)
            except DeliveryError as exc:
                error: Exception = exc
                permanent = exc.permanent
            except Exception as exc:  # plugin boundary: a connector bug
                error = exc
                permanent = False
                logger.error(
                    "flow %r: connector %r raised",
                    self.flow,
                    target.label,
                    exc_info=exc,
                )
            else:
                self._events_out[target.label][0] += 1
                return
            if permanent or attempt >= retry.attempts:
                tries = "1 try" if attempt == 1 else f"{attempt} tries"
                raise FlowError(
                    self.flow,
                    f"to {target.label!r} failed after {tries}: {error}",
                    permanent=permanent,
                ) from error
            delay = min(retry.max_delay, retry.delay * 2 ** (attempt - 1))
            delay *= random.uniform(0.8, 1.0)
            logger.warning(
                "flow %r: to %r failed (try %d of %d), retrying in %.2fs: %s",
                self.flow,
                target.label,
                attempt,
                retry.attempts,
                delay,
                error,
            )
            self._metrics.retries.labels(self.flow, target.label).inc()
            await asyncio.sleep(delay)
            attempt += 1
