"""Stream sources: consumer groups, ack after success, pending, dead letters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

import mycel
from mycel.testing import eventually, running


def _config(url: str, body: str, settings: str = "") -> str:
    return f"""
    connector "bus" {{ type = "memory" }}
    connector "r" {{
      type = "redis"
      url  = "{url}"
      {settings}
    }}
    {body}
    """


async def _pending(client: Any, stream: str, group: str) -> int:
    summary = await client.xpending(stream, group)
    return int(summary["pending"])


async def _settled(client: Any, stream: str, group: str) -> bool:
    """Whether every entry read by the group was acknowledged."""
    return await _pending(client, stream, group) == 0


class _Gate(mycel.Connector):
    """A target that holds each delivery until the test opens the gate."""

    type_name = "gate"
    target_operations = (mycel.Operation("pass", "wait for the gate"),)
    default_operation = "pass"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered: asyncio.Queue[mycel.Delivery] = asyncio.Queue()
        self.open = asyncio.Event()

    async def deliver(self, delivery: mycel.Delivery) -> None:
        self.entered.put_nowait(delivery)
        await self.open.wait()


class _GatePlugin:
    @staticmethod
    @mycel.hookimpl
    def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
        return [_Gate]


async def test_entry_is_acknowledged_only_after_its_flow_returned(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "jobs"
    config = _config(
        redis_url,
        f"""
        connector "gate" {{ type = "gate" }}
        flow "work" {{
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "gate" }}
        }}
        """,
        settings='consumer = "worker-1"',
    )
    async with running(config, plugins=[_GatePlugin]) as app:
        gate = app.connector("gate")
        assert isinstance(gate, _Gate)
        entry_id = (await redis_client.xadd(stream, {"data": '{"job": 1}'})).decode()

        delivery = await asyncio.wait_for(gate.entered.get(), 5)
        assert delivery.payload == {"job": 1}
        assert dict(delivery.context) == {
            "stream": stream,
            "id": entry_id,
            "group": "work",
            "fields": {},
        }
        pending = await redis_client.xpending_range(stream, "work", "-", "+", 10)
        assert [(p["message_id"].decode(), p["consumer"]) for p in pending] == [
            (entry_id, b"worker-1")
        ]

        gate.open.set()
        await eventually(lambda: _settled(redis_client, stream, "work"))


async def test_group_starts_at_new_entries_unless_told_beginning(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "log"
    await redis_client.xadd(stream, {"data": '{"n": 0}'})
    config = _config(
        redis_url,
        f"""
        flow "new_only" {{
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "bus"  target = "new" }}
        }}
        flow "replay" {{
          from {{ connector = "r"  operation = "stream:{stream}"  start = "beginning" }}
          to   {{ connector = "bus"  target = "all" }}
        }}
        """,
    )
    async with running(config) as app:
        new, every = app.listen("bus", "new"), app.listen("bus", "all")
        await redis_client.xadd(stream, {"data": '{"n": 1}'})
        got_all = [await asyncio.wait_for(every.get(), 5) for _ in range(2)]
        got_new = await asyncio.wait_for(new.get(), 5)
    assert sorted(p["n"] for _, p in got_all) == [0, 1]
    assert got_new == ("new", {"n": 1})
    assert new.empty()
    groups = await redis_client.xinfo_groups(stream)
    assert sorted(g["name"] for g in groups) == [b"new_only", b"replay"]


async def test_own_pending_entries_come_back_after_a_crash(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    # A process read two entries as consumer "host-a" and died before
    # acknowledging them: that is exactly what Redis holds afterwards.
    stream = redis_prefix + "orders"
    await redis_client.xgroup_create(stream, "billing", id="0", mkstream=True)
    for n in (1, 2):
        await redis_client.xadd(stream, {"data": f'{{"order": {n}}}'})
    read = await redis_client.xreadgroup("billing", "host-a", {stream: ">"}, count=10)
    assert len(read[0][1]) == 2
    assert await _pending(redis_client, stream, "billing") == 2

    # The restarted process, under the same consumer name, finishes them.
    config = _config(
        redis_url,
        f"""
        flow "bill" {{
          from {{ connector = "r"  operation = "stream:{stream}"  group = "billing" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
        settings='consumer = "host-a"',
    )
    async with running(config) as app:
        out = app.listen("bus", "out")
        got = [await asyncio.wait_for(out.get(), 5) for _ in range(2)]
        await eventually(lambda: _settled(redis_client, stream, "billing"))
    assert sorted(p["order"] for _, p in got) == [1, 2]


async def test_entries_left_by_another_consumer_are_claimed(
    redis_url: str,
    redis_client: Any,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = redis_prefix + "orders"
    await redis_client.xgroup_create(stream, "billing", id="0", mkstream=True)
    await redis_client.xadd(stream, {"data": '{"order": 1}'})
    await redis_client.xreadgroup("billing", "dead-host", {stream: ">"}, count=10)

    config = _config(
        redis_url,
        f"""
        flow "bill" {{
          from {{ connector = "r"  operation = "stream:{stream}"  group = "billing" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
        settings='consumer = "host-b"\n claim_idle = "50ms"',
    )
    caplog.set_level(logging.WARNING, logger="mycel.redis")
    async with running(config) as app:
        out = app.listen("bus", "out")
        assert await asyncio.wait_for(out.get(), 5) == ("out", {"order": 1})
        await eventually(lambda: _settled(redis_client, stream, "billing"))
    assert caplog.record_tuples == [
        (
            "mycel.redis",
            logging.WARNING,
            f"stream {stream!r}: claimed 1 entries another consumer of group "
            "'billing' left unacknowledged",
        )
    ]


async def test_entries_that_are_not_json_go_to_the_dead_stream(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "in"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          concurrency = 1
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
    )
    async with running(config) as app:
        out = app.listen("bus", "out")
        bad = await redis_client.xadd(stream, {"data": "{oops", "source": "app-7"})
        missing = await redis_client.xadd(stream, {"body": '{"a": 1}'})
        binary = await redis_client.xadd(stream, {"data": b"\xff\xfe"})
        await redis_client.xadd(stream, {"data": '{"a": 2}', "source": "app-7"})
        assert await asyncio.wait_for(out.get(), 5) == ("out", {"a": 2})
        await eventually(lambda: _settled(redis_client, stream, "f"))

    dead = await redis_client.xrange(stream + ".dead")
    assert [fields for _, fields in dead] == [
        {
            b"data": b"{oops",
            b"source": b"app-7",
            b"mycel.reason": b"field 'data' is not JSON: Expecting property name "
            b"enclosed in double quotes: line 1 column 2 (char 1)",
            b"mycel.stream": stream.encode(),
            b"mycel.id": bad,
            b"mycel.group": b"f",
            b"mycel.flow": b"f",
        },
        {
            b"body": b'{"a": 1}',
            b"mycel.reason": b"entry has no field 'data'",
            b"mycel.stream": stream.encode(),
            b"mycel.id": missing,
            b"mycel.group": b"f",
            b"mycel.flow": b"f",
        },
        {
            b"data": b"\xff\xfe",
            b"mycel.reason": b"field 'data' is not UTF-8 text",
            b"mycel.stream": stream.encode(),
            b"mycel.id": binary,
            b"mycel.group": b"f",
            b"mycel.flow": b"f",
        },
    ]


async def test_entry_whose_flow_gives_up_goes_to_the_dead_stream(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "in"
    wrong = redis_prefix + "not-a-stream"
    await redis_client.set(wrong, "text")
    config = _config(
        redis_url,
        f"""
        flow "copy" {{
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "r"  operation = "xadd"  target = "{wrong}" }}
        }}
        """,
    )
    async with running(config):
        entry = await redis_client.xadd(stream, {"data": '{"a": 1}'})

        async def dead_letters() -> bool:
            return bool(await redis_client.xlen(stream + ".dead") == 1)

        await eventually(dead_letters)
        await eventually(lambda: _settled(redis_client, stream, "copy"))

    [(_, fields)] = await redis_client.xrange(stream + ".dead")
    assert fields == {
        b"data": b'{"a": 1}',
        b"mycel.reason": (
            f"flow 'copy': to 'r' failed after 1 try: redis refused xadd to "
            f"{wrong!r}: WRONGTYPE Operation against a key holding the wrong kind "
            "of value"
        ).encode(),
        b"mycel.stream": stream.encode(),
        b"mycel.id": entry,
        b"mycel.group": b"copy",
        b"mycel.flow": b"copy",
    }


async def test_shutdown_lets_entries_in_flight_finish_and_acknowledges_them(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "jobs"
    config = _config(
        redis_url,
        f"""
        connector "gate" {{ type = "gate" }}
        flow "work" {{
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "gate" }}
        }}
        """,
    )
    async with running(config, plugins=[_GatePlugin]) as app:
        gate = app.connector("gate")
        assert isinstance(gate, _Gate)
        await redis_client.xadd(stream, {"data": '{"job": 1}'})
        await asyncio.wait_for(gate.entered.get(), 5)
        stopping = asyncio.create_task(app.runtime.stop(timeout=5))
        await asyncio.sleep(0)
        assert await _pending(redis_client, stream, "work") == 1
        gate.open.set()
        assert await stopping is True
    assert await _pending(redis_client, stream, "work") == 0


async def test_reading_goes_on_after_the_connection_is_killed(
    redis_url: str,
    redis_client: Any,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = redis_prefix + "in"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
        settings=f'client_name = "{redis_prefix}c"\n reconnect_delay = "10ms"',
    )
    caplog.set_level(logging.WARNING, logger="mycel.redis")
    async with running(config) as app:
        out = app.listen("bus", "out")
        await redis_client.xadd(stream, {"data": '{"n": 1}'})
        assert await asyncio.wait_for(out.get(), 5) == ("out", {"n": 1})

        # Cut every connection of the connector, the blocked read included.
        clients = await redis_client.client_list()
        ours = [c["id"] for c in clients if c["name"] == redis_prefix + "c"]
        assert ours
        for client_id in ours:
            await redis_client.client_kill_filter(_id=client_id)

        await redis_client.xadd(stream, {"data": '{"n": 2}'})
        assert await asyncio.wait_for(out.get(), 10) == ("out", {"n": 2})
        await eventually(lambda: _settled(redis_client, stream, "f"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(": ")[0] for w in warnings] == [f"stream {stream!r}"]
    assert warnings[0].startswith(
        f"stream {stream!r}: connection lost, reading again in 0.01s: "
    )


async def test_a_deleted_stream_gets_its_group_back(
    redis_url: str,
    redis_client: Any,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = redis_prefix + "in"
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          from {{ connector = "r"  operation = "stream:{stream}"  start = "beginning" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
        settings='timeout = "1s"',
    )
    caplog.set_level(logging.WARNING, logger="mycel.redis")
    async with running(config) as app:
        out = app.listen("bus", "out")
        await redis_client.xadd(stream, {"data": '{"n": 1}'})
        assert await asyncio.wait_for(out.get(), 5) == ("out", {"n": 1})

        await redis_client.delete(stream)
        await redis_client.xadd(stream, {"data": '{"n": 2}'})
        assert await asyncio.wait_for(out.get(), 10) == ("out", {"n": 2})
    assert (
        "mycel.redis",
        logging.WARNING,
        f"stream {stream!r}: group 'f' is gone, creating it again",
    ) in caplog.record_tuples


async def test_many_entries_in_flight_are_each_delivered_and_acknowledged(
    redis_url: str, redis_client: Any, redis_prefix: str
) -> None:
    stream = redis_prefix + "many"
    await redis_client.xgroup_create(stream, "f", id="0", mkstream=True)
    async with redis_client.pipeline(transaction=False) as pipe:
        for n in range(500):
            pipe.xadd(stream, {"data": f'{{"n": {n}}}'})
        await pipe.execute()
    config = _config(
        redis_url,
        f"""
        flow "f" {{
          concurrency = 50
          from {{ connector = "r"  operation = "stream:{stream}" }}
          to   {{ connector = "bus"  target = "out" }}
        }}
        """,
        settings="batch = 20",
    )
    async with running(config) as app:
        out = app.listen("bus", "out")
        got = [await asyncio.wait_for(out.get(), 5) for _ in range(500)]
        await eventually(lambda: _settled(redis_client, stream, "f"))
    assert sorted(payload["n"] for _, payload in got) == list(range(500))
    assert out.empty()
