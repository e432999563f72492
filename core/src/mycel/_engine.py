"""Running one flow for one event: transform, filter, deliver, retry.

A source hands each event to :meth:`FlowHandle.process` and learns its
outcome: it returns when every ``to`` block succeeded (or was filtered out),
and raises :class:`~mycel.errors.FlowError` when the flow gave up. An
at-least-once source acknowledges only what returned, and applies its
dead-letter policy to what raised.

A source that has several events ready at once may hand them together to
:meth:`FlowHandle.process_many` instead, which returns one outcome per
event; a flow that evaluates nothing per event then sends them to its
target in one :meth:`~mycel.Connector.deliver_many` call.

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
from collections.abc import Awaitable, Mapping, Sequence
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

    __slots__ = ("_idle", "count")

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.count = 0
        self._idle: asyncio.Future[None] | None = None
        """Set only while someone waits for the count to reach zero."""
        if metrics is not None:
            metrics.in_flight.set_function(lambda: self.count)

    def enter(self, events: int = 1) -> None:
        self.count += events

    def leave(self, events: int = 1) -> None:
        self.count -= events
        if self.count == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if the timeout ran out."""
        if self.count == 0:
            return True
        if self._idle is None or self._idle.done():
            self._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        except TimeoutError:
            return False
        return True


class _Target:
    """One ``to`` block bound to its connector."""

    __slots__ = ("config", "connector", "delivered", "label")

    def __init__(
        self, flow: str, config: ToConfig, connector: Connector, metrics: Metrics
    ) -> None:
        self.config = config
        self.connector = connector
        self.label = connector.name
        self.delivered = metrics.events_out.cell(flow, connector.name)
        """The flow's events_out counter for this connector."""


class _Direct:
    """What a flow with nothing to evaluate sends: see FlowHandle.process."""

    __slots__ = ("deliver", "deliver_many", "filter", "operation", "options", "target")

    def __init__(self, target: _Target) -> None:
        to = target.config
        assert to.operation.constant is not None
        self.deliver = target.connector.deliver
        self.deliver_many = target.connector.deliver_many
        self.operation = to.operation.constant
        self.target = to.target.constant if to.target is not None else None
        self.filter = to.filter if to.fan_out else None
        self.options = to.options

    def delivery(self, flow: str, event: Event) -> Delivery:
        """The event, unchanged, as this ``to`` block sends it."""
        return Delivery(
            flow,
            self.operation,
            self.target,
            event.input,
            event.input,
            event.context,
            self.filter,
            self.options,
        )


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
        self._targets = [
            _Target(flow.name, to, targets[to.connector], metrics) for to in flow.to
        ]
        self._metrics = metrics
        self._events_in = metrics.events_in.cell(flow.name)
        self._in_flight = in_flight
        self._direct = self._direct_target()
        self.batches = self._direct is not None and (
            type(self._targets[0].connector).deliver_many is not Connector.deliver_many
        )
        """Whether :meth:`process_many` beats :meth:`process` per event: the
        flow sends events unchanged to one target that writes a batch in
        one go (overrides :meth:`~mycel.Connector.deliver_many`). A source
        hands over batches only then; otherwise one event per worker keeps
        the work spread over its workers."""
        self._together = _Together(self) if self.batches else None

    def _direct_target(self) -> _Direct | None:
        """The one ``to`` block when the flow evaluates nothing per event.

        The most common flow passes each event unchanged to one target with
        fixed ``operation`` and ``target``: :meth:`process` then skips the
        transform, filter and template machinery altogether.

        """
        if self._transform or len(self._targets) != 1:
            return None
        to = self._targets[0].config
        if to.filter is not None and not to.fan_out:
            return None
        if to.operation.constant is None:
            return None
        if to.target is not None and to.target.constant is None:
            return None
        return _Direct(self._targets[0])

    async def process(self, event: Event) -> None:
        """Run the flow for ``event``; raise FlowError if it gave up.

        Where the target writes batches (:attr:`batches`), the events handed
        to ``process`` in one event loop iteration, by however many callers,
        go to it together, as :meth:`process_many` sends them, at the end of
        that iteration; each call still returns or raises for its own
        event. A source that hands over one event at a time (a WebSocket
        message, a RabbitMQ delivery) so gets one transaction for the rows
        of a burst rather than one per row. Cancelling such a call does not
        take its event back: it may still be delivered, as an at-least-once
        source that redelivers what it did not see succeed expects.

        """
        together = self._together
        if together is not None:
            outcome = await together.submit(event)
            if outcome is not None:
                raise outcome
            return
        self._events_in[0] += 1
        in_flight = self._in_flight
        in_flight.enter()
        try:
            direct = self._direct
            if direct is None:
                await self._process(event)
                return
            # The direct path: one delivery, built without evaluating anything.
            delivery = direct.delivery(self.flow, event)
            try:
                await direct.deliver(delivery)
            except Exception as exc:
                await self._retry(self._targets[0], delivery, exc)
            else:
                self._targets[0].delivered[0] += 1
        except FlowError:
            self._metrics.events_failed.labels(self.flow).inc()
            raise
        finally:
            in_flight.leave()

    async def process_many(
        self, events: Sequence[Event], *, ordered: bool = False
    ) -> list[FlowError | None]:
        """Run the flow for several events; one outcome per event, in order.

        For a source that has several events ready at once. Each outcome is
        None where :meth:`process` would have returned, or the FlowError it
        would have raised; one event's failure does not touch the others.
        Metrics and retries are those of :meth:`process`.

        A flow that evaluates nothing per event (one ``to`` block with fixed
        ``operation`` and ``target``, no transform) sends all the events to
        its target in one :meth:`~mycel.Connector.deliver_many` call, then
        retries each failed delivery on its own (if ``deliver_many`` itself
        raised, or returned the wrong number of outcomes, every delivery
        failed: a connector bug, logged by the retry). Any other flow runs
        :meth:`process` for each event concurrently. Either way the events
        are started in order but may finish in any order.

        ``ordered=True`` is for a source that keeps order (CDC): the events
        reach the target in the order given. Where the target writes a
        batch in one go (:attr:`batches`) it still gets them in one
        ``deliver_many`` call, which applies them in order, and the failed
        ones are retried one after the other, in order; any other flow runs
        :meth:`process` for one event after the other.

        """
        direct = self._direct
        if direct is None or (not self.batches and (ordered or len(events) == 1)):
            if ordered:
                return [await _outcome_of(self.process(event)) for event in events]
            results = await asyncio.gather(
                *(self.process(event) for event in events), return_exceptions=True
            )
            return [_outcome(result) for result in results]

        count = len(events)
        self._events_in[0] += count
        in_flight = self._in_flight
        in_flight.enter(count)
        try:
            return await self._deliver_together(events, ordered)
        finally:
            in_flight.leave(count)

    async def _deliver_together(
        self, events: Sequence[Event], ordered: bool
    ) -> list[FlowError | None]:
        """process_many's direct path, for events already counted in."""
        # One delivery per event, handed over at once.
        direct = self._direct
        assert direct is not None
        deliveries = [direct.delivery(self.flow, event) for event in events]
        target = self._targets[0]
        errors = await self._deliver_many(target, direct, deliveries)

        # What failed goes through the retry policy, each on its own.
        failed: list[tuple[int, Exception]] = []
        for i, error in enumerate(errors):
            if error is None:
                continue
            if not isinstance(error, Exception):
                raise error  # cancellation: not an outcome
            failed.append((i, error))
        count = len(deliveries)
        target.delivered[0] += count - len(failed)
        outcomes: list[FlowError | None] = [None] * count
        if not failed:
            return outcomes
        retries = (self._retry_outcome(target, deliveries[i], e) for i, e in failed)
        if ordered:
            retried = [await retry for retry in retries]
        else:
            retried = await asyncio.gather(*retries)
        for (i, _), outcome in zip(failed, retried, strict=True):
            outcomes[i] = outcome
        self._metrics.events_failed.labels(self.flow).inc(
            sum(outcome is not None for outcome in retried)
        )
        return outcomes

    @staticmethod
    async def _deliver_many(
        target: _Target, direct: _Direct, deliveries: list[Delivery]
    ) -> Sequence[BaseException | None]:
        """The target's outcomes; a connector bug fails every delivery."""
        try:
            errors = await direct.deliver_many(deliveries)
        except Exception as exc:  # the plugin boundary: a connector bug
            return [exc] * len(deliveries)
        if len(errors) != len(deliveries):
            bug = TypeError(
                f"connector {target.label!r}: deliver_many returned "
                f"{len(errors)} outcomes for {len(deliveries)} deliveries"
            )
            return [bug] * len(deliveries)
        return errors

    async def _retry_outcome(
        self, target: _Target, delivery: Delivery, error: Exception
    ) -> FlowError | None:
        """:meth:`_retry`, returning its FlowError instead of raising it."""
        try:
            await self._retry(target, delivery, error)
        except FlowError as exc:
            return exc
        return None

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
        try:
            await target.connector.deliver(delivery)
        except Exception as exc:
            await self._retry(target, delivery, exc)
        else:
            target.delivered[0] += 1

    async def _retry(
        self, target: _Target, delivery: Delivery, error: Exception
    ) -> None:
        """After a failed first try: try again as the retry policy allows.

        Returns once a try succeeds; raises FlowError when the error is
        permanent or the tries are used up.

        """
        retry = self.retry
        attempt = 1
        while True:
            if isinstance(error, DeliveryError):
                permanent = error.permanent
            else:  # the plugin boundary: a connector bug
                permanent = False
                logger.error(
                    "flow %r: connector %r raised",
                    self.flow,
                    target.label,
                    exc_info=error,
                )
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
            try:
                await target.connector.deliver(delivery)
            except Exception as exc:
                error = exc
            else:
                target.delivered[0] += 1
                return


class _Together:
    """The events handed to one flow's process() in one loop iteration.

    At the end of the iteration they go to the target in one
    ``deliver_many`` call, in a task of their own (see
    :meth:`FlowHandle.process`); each caller awaits its own outcome. Only
    for flows whose target writes batches.

    """

    __slots__ = ("_handle", "_pending", "_running")

    def __init__(self, handle: FlowHandle) -> None:
        self._handle = handle
        self._pending: list[tuple[Event, asyncio.Future[FlowError | None]]] = []
        self._running: set[asyncio.Task[None]] = set()
        """Keeps the tasks alive until they are done."""

    def submit(self, event: Event) -> asyncio.Future[FlowError | None]:
        """The event's outcome, once its batch has been delivered."""
        handle = self._handle
        handle._events_in[0] += 1
        handle._in_flight.enter()
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._hand_over)
        future: asyncio.Future[FlowError | None] = loop.create_future()
        self._pending.append((event, future))
        return future

    def _hand_over(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._deliver(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _deliver(
        self, batch: list[tuple[Event, asyncio.Future[FlowError | None]]]
    ) -> None:
        handle = self._handle
        try:
            outcomes = await handle._deliver_together([e for e, _ in batch], False)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the task's top: each caller gets it raised
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            handle._in_flight.leave(len(batch))
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():  # its caller may have been cancelled
                future.set_result(outcome)


async def _outcome_of(running: Awaitable[None]) -> FlowError | None:
    """Await one process(); what it did, as process_many() reports it."""
    try:
        await running
    except FlowError as exc:
        return exc
    return None


def _outcome(result: BaseException | None) -> FlowError | None:
    """What process() did, as process_many() reports it."""
    if result is None or isinstance(result, FlowError):
        return result
    raise result  # not an outcome (cancellation): let it propagate
