"""The flow engine: transform, filters, templates, retries, outcomes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from mycel import (
    Connector,
    Delivery,
    DeliveryError,
    Event,
    FlowError,
    Operation,
    Settings,
    _builtin,
    hookimpl,
)
from mycel.testing import eventually, running


class RecorderSettings(Settings):
    fail_times: int = 0
    """Fail this many deliveries before succeeding."""

    permanent: bool = False


class Recorder(Connector):
    """A target that records deliveries and fails on demand."""

    type_name = "recorder"
    settings_model = RecorderSettings
    target_operations = (Operation("record", "record the delivery"),)
    default_operation = "record"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deliveries: list[Delivery] = []
        self.attempts = 0

    async def deliver(self, delivery: Delivery) -> None:
        self.attempts += 1
        settings = self.settings
        assert isinstance(settings, RecorderSettings)
        if self.attempts <= settings.fail_times:
            raise DeliveryError(
                f"refused try {self.attempts}", permanent=settings.permanent
            )
        self.deliveries.append(delivery)


class Plugin:
    @hookimpl
    def mycel_connector_types(self) -> list[type[Connector]]:
        return [Recorder]


PLUGINS = [_builtin, Plugin()]


def config(flow_body: str, recorder: str = "") -> str:
    return f"""
    connector "bus" {{ type = "memory" }}
    connector "rec" {{
      type = "recorder"
      {recorder}
    }}
    connector "rec2" {{ type = "recorder" }}
    flow "f" {{
      {flow_body}
      retry {{
        attempts = 3
        delay = "1ms"
      }}
    }}
    """


async def process(app: Any, payload: Any) -> None:
    await app.runtime.flows["f"].process(Event(payload, {"topic": "t"}))


async def test_transform_fields_see_earlier_output() -> None:
    text = config(
        """
        from { connector = "bus" operation = "t" }
        transform {
          id    = "input.order_id"
          label = "'order-' + string(output.id)"
        }
        to { connector = "rec" }
        """
    )
    async with running(text, plugins=PLUGINS) as app:
        await process(app, {"order_id": 5})
        (delivery,) = app.connector("rec").deliveries
        assert delivery.payload == {"id": 5, "label": "order-5"}
        assert delivery.input == {"order_id": 5}


async def test_without_transform_the_input_is_delivered() -> None:
    text = config(
        'from { connector = "bus" operation = "t" }\nto { connector = "rec" }'
    )
    async with running(text, plugins=PLUGINS) as app:
        await process(app, {"a": 1})
        assert app.connector("rec").deliveries[0].payload == {"a": 1}


async def test_filter_decides_whether_a_to_runs() -> None:
    text = config(
        """
        from { connector = "bus" operation = "t" }
        to {
          connector = "rec"
          filter = "input.total > 100"
        }
        to { connector = "rec2" }
        """
    )
    async with running(text, plugins=PLUGINS) as app:
        await process(app, {"total": 50})
        await process(app, {"total": 500})
        await process(app, {})  # the filter fails: counted as false
        assert [d.payload for d in app.connector("rec").deliveries] == [{"total": 500}]
        assert len(app.connector("rec2").deliveries) == 3
        metrics = app.runtime.metrics.registry
        labels = {"flow": "f", "connector": "rec"}
        assert metrics.get_sample_value("mycel_filter_dropped_total", labels) == 2
        assert metrics.get_sample_value("mycel_filter_errors_total", labels) == 1


async def test_operation_and_target_templates_render_per_event() -> None:
    text = config(
        """
        from { connector = "bus" operation = "t" }
        to { connector = "bus" target = "orders.${input.region}" }
        """
    )
    async with running(text, plugins=PLUGINS) as app:
        queue = app.listen("bus", "orders.*")
        await process(app, {"region": "eu"})
        assert await asyncio.wait_for(queue.get(), 1) == ("orders.eu", {"region": "eu"})


async def test_retry_until_success() -> None:
    text = config(
        'from { connector = "bus" operation = "t" }\nto { connector = "rec" }',
        "fail_times = 2",
    )
    async with running(text, plugins=PLUGINS) as app:
        await process(app, {"n": 1})
        assert app.connector("rec").attempts == 3
        assert len(app.connector("rec").deliveries) == 1


async def test_gives_up_after_the_last_try() -> None:
    text = config(
        'from { connector = "bus" operation = "t" }\nto { connector = "rec" }',
        "fail_times = 10",
    )
    async with running(text, plugins=PLUGINS) as app:
        with pytest.raises(FlowError) as info:
            await process(app, {"n": 1})
        assert (
            str(info.value) == "flow 'f': to 'rec' failed after 3 tries: refused try 3"
        )
        assert info.value.permanent is False
        failed = app.runtime.metrics.registry.get_sample_value(
            "mycel_events_failed_total", {"flow": "f"}
        )
        assert failed == 1


async def test_permanent_failure_is_not_retried() -> None:
    text = config(
        'from { connector = "bus" operation = "t" }\nto { connector = "rec" }',
        "fail_times = 10\npermanent = true",
    )
    async with running(text, plugins=PLUGINS) as app:
        with pytest.raises(FlowError) as info:
            await process(app, {"n": 1})
        assert info.value.permanent is True
        assert app.connector("rec").attempts == 1


async def test_retry_repeats_only_the_failed_target() -> None:
    text = config(
        """
        from { connector = "bus" operation = "t" }
        to { connector = "rec" }
        to { connector = "rec2" }
        """,
        "fail_times = 1",
    )
    async with running(text, plugins=PLUGINS) as app:
        await process(app, {"n": 1})
        assert app.connector("rec").attempts == 2
        assert app.connector("rec2").attempts == 1


async def test_transform_error_fails_permanently() -> None:
    text = config(
        """
        from { connector = "bus" operation = "t" }
        transform { id = "input.missing" }
        to { connector = "rec" }
        """
    )
    async with running(text, plugins=PLUGINS) as app:
        with pytest.raises(FlowError) as info:
            await process(app, {"n": 1})
        assert str(info.value) == (
            "flow 'f': transform field 'id' failed: 'input.missing': no such key 'missing'"
        )
        assert info.value.permanent is True
        assert app.connector("rec").attempts == 0


async def test_events_in_and_out_are_counted() -> None:
    text = config(
        'from { connector = "bus" operation = "t" }\nto { connector = "rec" }'
    )
    async with running(text, plugins=PLUGINS) as app:
        for i in range(3):
            await process(app, {"n": i})
        registry = app.runtime.metrics.registry
        assert registry.get_sample_value("mycel_events_in_total", {"flow": "f"}) == 3
        assert (
            registry.get_sample_value(
                "mycel_events_out_total", {"flow": "f", "connector": "rec"}
            )
            == 3
        )


async def test_memory_source_runs_the_flow() -> None:
    text = config(
        'from { connector = "bus" operation = "orders.#" }\nto { connector = "rec" }'
    )
    async with running(text, plugins=PLUGINS) as app:
        await app.publish("bus", "orders.created.eu", {"id": 1})
        await app.publish("bus", "payments.x", {"id": 2})
        await app.memory("bus").drain()
        assert [d.payload for d in app.connector("rec").deliveries] == [{"id": 1}]
        assert app.connector("rec").deliveries[0].context == {
            "topic": "orders.created.eu"
        }


async def test_shutdown_waits_for_in_flight_events() -> None:
    gate = asyncio.Event()

    class Slow(Recorder):
        type_name = "slow"

        async def deliver(self, delivery: Delivery) -> None:
            await gate.wait()
            await super().deliver(delivery)

    class SlowPlugin:
        @hookimpl
        def mycel_connector_types(self) -> list[type[Connector]]:
            return [Slow]

    text = """
    connector "bus" { type = "memory" }
    connector "slow" { type = "slow" }
    flow "f" {
      from { connector = "bus" operation = "t" }
      to { connector = "slow" }
    }
    """
    from mycel import Runtime
    from mycel.testing import load_test_config

    runtime = Runtime(load_test_config(text, plugins=[_builtin, SlowPlugin()]))
    await runtime.start()
    task = asyncio.create_task(runtime.flows["f"].process(Event({"n": 1})))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(runtime.stop(timeout=5))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    gate.set()
    assert await asyncio.wait_for(stopping, 5) is True
    await task
    assert len(runtime.connectors["slow"].deliveries) == 1  # type: ignore[attr-defined]


class Picky(Connector):
    """A target that refuses payloads marked ``fail`` and records batches.

    ``fail = "always"`` is refused permanently, ``fail = "once"`` only on
    its first try; ``broken`` raises an error that is no DeliveryError.
    ``wait`` seconds pass before each try is decided.

    """

    type_name = "picky"
    target_operations = (Operation("record", "record the delivery"),)
    default_operation = "record"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delivered: list[int] = []
        self.tries: dict[int, int] = {}
        self.batches: list[list[int]] = []

    async def deliver(self, delivery: Delivery) -> None:
        n = delivery.payload["n"]
        self.tries[n] = self.tries.get(n, 0) + 1
        if "wait" in delivery.payload:
            await asyncio.sleep(delivery.payload["wait"])
        fail = delivery.payload.get("fail")
        if fail == "broken":
            raise RuntimeError(f"bug on {n}")
        if fail == "always" or (fail == "once" and self.tries[n] == 1):
            raise DeliveryError(f"refused {n}", permanent=fail == "always")
        self.delivered.append(n)

    async def deliver_many(
        self, deliveries: Sequence[Delivery]
    ) -> list[BaseException | None]:
        self.batches.append([d.payload["n"] for d in deliveries])
        return await super().deliver_many(deliveries)


class PickyPlugin:
    @hookimpl
    def mycel_connector_types(self) -> list[type[Connector]]:
        return [Picky]


def picky_config(flow_body: str = "", concurrency: int = 4) -> str:
    return f"""
    connector "bus" {{ type = "memory" }}
    connector "pk" {{ type = "picky" }}
    flow "f" {{
      concurrency = {concurrency}
      from {{ connector = "bus" operation = "t" }}
      {flow_body}
      to {{ connector = "pk" }}
      retry {{
        attempts = 3
        delay = "1ms"
      }}
    }}
    """


PICKY_PLUGINS = [_builtin, PickyPlugin()]

MIXED = [{"n": 1}, {"n": 2, "fail": "always"}, {"n": 3, "fail": "once"}, {"n": 4}]


def picky_of(app: Any) -> Picky:
    connector = app.connector("pk")
    assert isinstance(connector, Picky)
    return connector


def sample(app: Any, name: str, **labels: str) -> float | None:
    value: float | None = app.runtime.metrics.registry.get_sample_value(name, labels)
    return value


async def test_deliver_many_by_default_delivers_each_and_reports_each() -> None:
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        picky = picky_of(app)
        deliveries = [
            Delivery("f", "record", None, payload, payload, {})
            for payload in [{"n": 1}, {"n": 2, "fail": "always"}, {"n": 3}]
            + [{"n": 4, "fail": "broken"}]
        ]
        outcomes = await Connector.deliver_many(picky, deliveries)
    assert [type(outcome).__name__ for outcome in outcomes] == [
        "NoneType",
        "DeliveryError",
        "NoneType",
        "RuntimeError",
    ]
    assert [str(outcome) for outcome in outcomes[1::2]] == ["refused 2", "bug on 4"]
    assert isinstance(outcomes[1], DeliveryError) and outcomes[1].permanent
    assert picky.delivered == [1, 3]


async def test_process_many_hands_the_target_one_batch_and_counts_each_event() -> None:
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        flow = app.runtime.flows["f"]
        outcomes = await flow.process_many([Event(p, {"topic": "t"}) for p in MIXED])
        picky = picky_of(app)
        assert picky.batches == [[1, 2, 3, 4]]
        assert picky.tries == {1: 1, 2: 1, 3: 2, 4: 1}
        assert sorted(picky.delivered) == [1, 3, 4]
        assert [str(outcome) if outcome else None for outcome in outcomes] == [
            None,
            "flow 'f': to 'pk' failed after 1 try: refused 2",
            None,
            None,
        ]
        assert outcomes[1] is not None and outcomes[1].permanent is True
        assert sample(app, "mycel_events_in_total", flow="f") == 4
        assert sample(app, "mycel_events_out_total", flow="f", connector="pk") == 3
        assert sample(app, "mycel_events_failed_total", flow="f") == 1
        assert sample(app, "mycel_retries_total", flow="f", connector="pk") == 1
        assert app.runtime.in_flight.count == 0


async def test_process_many_retries_only_the_failed_deliveries() -> None:
    events = [Event({"n": n, "fail": "once"} if n == 2 else {"n": n}) for n in range(5)]
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        outcomes = await app.runtime.flows["f"].process_many(events)
        picky = picky_of(app)
        assert outcomes == [None] * 5
        assert picky.tries == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
        assert picky.batches == [[0, 1, 2, 3, 4]]
        assert sorted(picky.delivered) == [0, 1, 2, 3, 4]
        assert sample(app, "mycel_retries_total", flow="f", connector="pk") == 1
        assert sample(app, "mycel_events_out_total", flow="f", connector="pk") == 5


async def test_process_many_gives_up_after_the_last_try_like_process() -> None:
    events = [Event({"n": 1}), Event({"n": 2, "fail": "broken"})]
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        outcomes = await app.runtime.flows["f"].process_many(events)
        assert outcomes[0] is None
        assert str(outcomes[1]) == ("flow 'f': to 'pk' failed after 3 tries: bug on 2")
        assert outcomes[1] is not None and outcomes[1].permanent is False
        assert picky_of(app).tries == {1: 1, 2: 3}
        assert sample(app, "mycel_events_failed_total", flow="f") == 1


async def test_process_many_with_a_transform_runs_each_event_on_its_own() -> None:
    text = picky_config('transform { n = "input.n"  fail = "input.fail" }')
    events = [Event({"n": 1, "fail": ""}), Event({"n": 2, "fail": "always"})]
    async with running(text, plugins=PICKY_PLUGINS) as app:
        outcomes = await app.runtime.flows["f"].process_many(events)
        picky = picky_of(app)
        assert picky.batches == []
        assert picky.delivered == [1]
        assert [str(outcome) if outcome else None for outcome in outcomes] == [
            None,
            "flow 'f': to 'pk' failed after 1 try: refused 2",
        ]
        assert sample(app, "mycel_events_in_total", flow="f") == 2
        assert sample(app, "mycel_events_failed_total", flow="f") == 1


async def test_events_handed_to_process_at_once_reach_the_target_together() -> None:
    # Four callers in one loop iteration, as a source's consumers would be:
    # one deliver_many call, and each caller gets its own event's outcome.
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        flow = app.runtime.flows["f"]
        assert flow.batches
        results = await asyncio.gather(
            *(flow.process(Event(p, {"topic": "t"})) for p in MIXED),
            return_exceptions=True,
        )
        picky = picky_of(app)
        assert picky.batches == [[1, 2, 3, 4]]
        assert sorted(picky.delivered) == [1, 3, 4]
        assert [str(r) if r else None for r in results] == [
            None,
            "flow 'f': to 'pk' failed after 1 try: refused 2",
            None,
            None,
        ]
        assert sample(app, "mycel_events_in_total", flow="f") == 4
        assert sample(app, "mycel_events_failed_total", flow="f") == 1
        assert app.runtime.in_flight.count == 0

        # The next iteration's events make a batch of their own.
        await flow.process(Event({"n": 5}, {"topic": "t"}))
        assert picky.batches[1:] == [[5]]


async def test_a_cancelled_caller_of_process_leaves_the_others_their_outcome() -> None:
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        flow = app.runtime.flows["f"]
        slow = asyncio.ensure_future(flow.process(Event({"n": 1, "wait": 0.05})))
        other = asyncio.ensure_future(flow.process(Event({"n": 2, "wait": 0.05})))
        picky = picky_of(app)
        await eventually(lambda: picky.tries == {1: 1, 2: 1})  # both under way
        slow.cancel()
        await other
        with pytest.raises(asyncio.CancelledError):
            await slow
        # Handed over before the cancel, its delivery still went through:
        # at least once, as any source that cancels may see.
        assert picky.batches == [[1, 2]]
        assert sorted(picky.delivered) == [1, 2]
        assert app.runtime.in_flight.count == 0


async def test_process_many_ordered_retries_the_failed_in_order() -> None:
    # The first try is one batch; of the two that fail, the first is slower
    # to retry, and still lands first.
    events = [
        Event({"n": 1, "fail": "once", "wait": 0.05}),
        Event({"n": 2}),
        Event({"n": 3, "fail": "once"}),
    ]
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        flow = app.runtime.flows["f"]
        outcomes = await flow.process_many(events, ordered=True)
        picky = picky_of(app)
        assert outcomes == [None] * 3
        assert picky.batches == [[1, 2, 3]]
        assert picky.delivered == [2, 1, 3]

        # Unordered, the retries run at once and the quicker lands first.
        picky.delivered.clear()
        picky.tries.clear()
        await flow.process_many(events)
        assert picky.delivered == [2, 3, 1]


async def test_process_many_ordered_runs_each_event_after_the_one_before() -> None:
    # With a transform there is no batch: one event at a time, in order.
    text = picky_config('transform { n = "input.n"  wait = "input.wait" }')
    events = [Event({"n": 1, "wait": 0.05}), Event({"n": 2, "wait": 0.0})]
    async with running(text, plugins=PICKY_PLUGINS) as app:
        flow = app.runtime.flows["f"]
        assert await flow.process_many(events, ordered=True) == [None, None]
        picky = picky_of(app)
        assert picky.delivered == [1, 2]
        picky.delivered.clear()
        assert await flow.process_many(events) == [None, None]
        assert picky.delivered == [2, 1]


async def test_memory_source_hands_queued_events_over_together() -> None:
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        bus = app.memory("bus")
        for payload in MIXED:
            await bus.publish("t", payload)
        await bus.drain()
        assert picky_of(app).batches == [[1, 2, 3, 4]]
        assert list(bus.dead_letters) == [
            ("t", MIXED[1], "flow 'f': to 'pk' failed after 1 try: refused 2")
        ]


async def test_memory_source_with_concurrency_one_keeps_publish_order() -> None:
    text = picky_config(concurrency=1)
    async with running(text, plugins=PICKY_PLUGINS) as app:
        bus = app.memory("bus")
        for payload in MIXED:
            await bus.publish("t", payload)
        await bus.drain()
        picky = picky_of(app)
        assert picky.batches == [[1], [2], [3], [4]]  # one at a time
        assert picky.delivered == [1, 3, 4]


async def test_a_publisher_that_never_waits_still_lets_the_flow_work() -> None:
    # Once a batch's worth is queued for an idle worker, publish yields to it.
    async with running(picky_config(), plugins=PICKY_PLUGINS) as app:
        bus = app.memory("bus")
        for n in range(3 * 512):
            await bus.publish("t", {"n": n})
        picky = picky_of(app)
        assert picky.batches, "nothing ran while the publisher was publishing"
        await bus.drain()
        assert sorted(picky.delivered) == list(range(3 * 512))
        assert max(map(len, picky.batches)) <= 512


class Gated(Picky):
    type_name = "gated"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def deliver(self, delivery: Delivery) -> None:
        await self.gate.wait()
        await super().deliver(delivery)


class GatedPlugin:
    @hookimpl
    def mycel_connector_types(self) -> list[type[Connector]]:
        return [Gated]


GATED = (
    picky_config(concurrency=1)
    .replace('type = "picky"', 'type = "gated"')
    .replace('type = "memory"', 'type = "memory"\n buffer = 2')
)


async def test_a_full_buffer_holds_the_publisher_back_and_loses_nothing() -> None:
    async with running(GATED, plugins=[_builtin, GatedPlugin()]) as app:
        bus = app.memory("bus")
        gated = app.connector("pk")
        assert isinstance(gated, Gated)

        async def publish_all() -> None:
            for n in range(6):
                await bus.publish("t", {"n": n})

        publisher = asyncio.create_task(publish_all())
        # One event taken by the worker, two queued: the fourth must wait.
        await asyncio.sleep(0.05)
        assert not publisher.done()
        assert gated.delivered == []
        gated.gate.set()
        await asyncio.wait_for(publisher, 5)
        await bus.drain()
        assert gated.delivered == list(range(6))


async def test_a_cancelled_waiting_publisher_passes_the_room_on() -> None:
    async with running(GATED, plugins=[_builtin, GatedPlugin()]) as app:
        bus = app.memory("bus")
        gated = app.connector("pk")
        assert isinstance(gated, Gated)
        for n in range(3):
            await bus.publish("t", {"n": n})  # one taken, two queued
        await asyncio.sleep(0)
        first = asyncio.create_task(bus.publish("t", {"n": 3}))
        second = asyncio.create_task(bus.publish("t", {"n": 4}))
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()
        first.cancel()
        gated.gate.set()
        await asyncio.wait_for(second, 5)
        await bus.drain()
        assert gated.delivered == [0, 1, 2, 4]


async def test_a_deliver_many_that_raises_fails_each_delivery_into_its_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Raising(Picky):
        type_name = "raising"

        async def deliver_many(
            self, deliveries: Sequence[Delivery]
        ) -> list[BaseException | None]:
            self.batches.append([d.payload["n"] for d in deliveries])
            raise RuntimeError("bulk call broke")

    class RaisingPlugin:
        @hookimpl
        def mycel_connector_types(self) -> list[type[Connector]]:
            return [Raising]

    text = picky_config().replace('type = "picky"', 'type = "raising"')
    with caplog.at_level(logging.ERROR, "mycel.flow"):
        async with running(text, plugins=[_builtin, RaisingPlugin()]) as app:
            outcomes = await app.runtime.flows["f"].process_many(
                [Event({"n": 1}), Event({"n": 2})]
            )
            raising = app.connector("pk")
            assert isinstance(raising, Raising)
            assert raising.batches == [[1, 2]]
            assert sorted(raising.delivered) == [1, 2]
    assert outcomes == [None, None]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "flow 'f': connector 'pk' raised"),
        ("ERROR", "flow 'f': connector 'pk' raised"),
    ]
