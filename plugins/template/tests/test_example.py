"""Tests of the example connector, in real flows, through mycel.testing.

Run them with the distribution installed (``pip install -e ".[test]"``):
``running()`` loads installed plugins from their entry points, so these
tests also prove that the entry point works.

"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

import mycel
import mycel_example
from mycel.testing import load_test_config, running


def _config(directory: Path, body: str) -> str:
    return f"""
    connector "bus" {{ type = "memory" }}
    connector "ex" {{
      type      = "example"
      interval  = "10ms"
      directory = "{directory}"
    }}
    {body}
    """


async def test_append_writes_one_json_line_per_event(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
        flow "keep" {
          from { connector = "bus"  operation = "orders.*" }
          to   { connector = "ex"   target = "${input.region}.jsonl" }
        }
        """,
    )
    async with running(config) as app:
        await app.publish("bus", "orders.created", {"id": 1, "region": "eu"})
        await app.publish("bus", "orders.created", {"id": 2, "region": "eu"})
        await app.memory("bus").drain()

    lines = (tmp_path / "eu.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == ['{"id":1,"region":"eu"}', '{"id":2,"region":"eu"}']


async def test_tick_source_counts_up(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
        flow "clock" {
          from { connector = "ex"   operation = "tick" }
          to   { connector = "bus"  target = "ticks" }
        }
        """,
    )
    async with running(config) as app:
        ticks = app.listen("bus", "ticks")
        got = [await asyncio.wait_for(ticks.get(), 5) for _ in range(3)]
    assert got == [
        ("ticks", {"tick": 1}),
        ("ticks", {"tick": 2}),
        ("ticks", {"tick": 3}),
    ]


async def test_target_outside_directory_is_refused_permanently(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
        flow "escape" {
          from { connector = "bus"  operation = "x" }
          to   { connector = "ex"   target = "../escape.jsonl" }
        }
        """,
    )
    async with running(config) as app:
        await app.publish("bus", "x", {"id": 1})
        await app.memory("bus").drain()
        dead = list(app.memory("bus").dead_letters)

    assert dead == [
        (
            "x",
            {"id": 1},
            f"flow 'escape': to 'ex' failed after 1 try: target '../escape.jsonl' "
            f"is outside {str(tmp_path.resolve())!r}",
        )
    ]
    assert not (tmp_path.parent / "escape.jsonl").exists()


class _Flaky(mycel.Connector):
    """A target that fails its first delivery, to test redelivery of a tick."""

    type_name = "flaky"
    target_operations = (mycel.Operation("send", "fails once, then records"),)
    default_operation = "send"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.received: asyncio.Queue[object] = asyncio.Queue()
        self.failed = False

    async def deliver(self, delivery: mycel.Delivery) -> None:
        if not self.failed:
            self.failed = True
            raise mycel.DeliveryError("not yet")
        self.received.put_nowait(delivery.payload)


class _FlakyPlugin:
    @staticmethod
    @mycel.hookimpl
    def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
        return [_Flaky]


async def test_tick_is_sent_again_until_its_flow_succeeds(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """
        connector "flaky" { type = "flaky" }
        flow "clock" {
          from  { connector = "ex"     operation = "tick" }
          to    { connector = "flaky" }
          retry { attempts = 1 }
        }
        """,
    )
    async with running(config, plugins=[_FlakyPlugin]) as app:
        flaky = app.connector("flaky")
        assert isinstance(flaky, _Flaky)
        first = await asyncio.wait_for(flaky.received.get(), 5)
        second = await asyncio.wait_for(flaky.received.get(), 5)
    assert (first, second) == ({"tick": 1}, {"tick": 2})


def test_bad_settings_are_reported_with_file_and_line() -> None:
    config = """
    connector "ex" {
      type     = "example"
      interval = "soon"
      colour   = "red"
    }
    """
    with pytest.raises(mycel.ConfigError) as caught:
        load_test_config(config)
    assert [str(p) for p in caught.value.problems] == [
        "test.mycel:4: connector 'ex': setting 'interval' = 'soon': 'soon' is not "
        'a duration; write it like "500ms", "30s", "5m" or "1h".',
        "test.mycel:5: connector 'ex': unknown setting 'colour'. "
        "Known settings: directory, interval, limit.",
    ]


def test_public_names() -> None:
    assert mycel_example.__all__ == sorted(mycel_example.__all__)
    assert mycel_example.__all__ == ["ExampleConnector", "ExampleSettings"]
