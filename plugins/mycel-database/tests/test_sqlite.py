"""The database target with the embedded SQLite driver."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mycel import ConfigError, ConnectorError, Delivery, Event
from mycel.testing import load_test_config, running, write_config

INIT = (
    "CREATE TABLE IF NOT EXISTS messages ("
    " id INTEGER PRIMARY KEY, channel_id INTEGER, text TEXT, meta JSON)"
)


def sqlite_config(database: str, target: str = "messages", extra: str = "") -> str:
    return f"""
    connector "ws" {{ type = "memory" }}
    connector "db" {{
      type     = "database"
      database = "{database}"
      init_sql = "{INIT}"
      {extra}
    }}
    flow "handle_ws_message" {{
      concurrency = 16
      from {{ connector = "ws"  operation = "message" }}
      to   {{ connector = "db"  target = "{target}" }}
    }}
    """


async def test_relative_path_resolves_against_the_configuration(tmp_path: Path) -> None:
    folder = write_config(sqlite_config("data/app.db"), tmp_path)
    (folder / "data").mkdir()
    async with running(folder) as app:
        for i in range(20):
            await app.publish(
                "ws", "message", {"channel_id": i, "text": f"m{i}", "meta": {"n": i}}
            )
        await asyncio.wait_for(app.memory("ws").drain(), 10)
        assert list(app.memory("ws").dead_letters) == []
    with sqlite3.connect(folder / "data" / "app.db") as conn:
        rows = conn.execute(
            "SELECT channel_id, text, meta FROM messages ORDER BY channel_id"
        ).fetchall()
    assert rows == [(i, f"m{i}", f'{{"n":{i}}}') for i in range(20)]


async def test_unknown_column_and_upsert(tmp_path: Path) -> None:
    folder = write_config(sqlite_config("app.db", target="UPSERT messages"), tmp_path)
    async with running(folder) as app:
        await app.publish("ws", "message", {"id": 1, "text": "first"})
        await asyncio.wait_for(app.memory("ws").drain(), 10)
        await app.publish("ws", "message", {"id": 1, "text": "second"})
        await app.publish("ws", "message", {"id": 2, "txt": "typo"})
        await asyncio.wait_for(app.memory("ws").drain(), 10)
        reasons = [reason for _, _, reason in app.memory("ws").dead_letters]
    assert reasons == [
        "flow 'handle_ws_message': to 'db' failed after 1 try: "
        "table 'messages' has no column 'txt'"
    ]
    with sqlite3.connect(folder / "app.db") as conn:
        assert conn.execute("SELECT id, text FROM messages").fetchall() == [
            (1, "second")
        ]


async def test_constraint_failure_is_pinned_on_its_event(tmp_path: Path) -> None:
    folder = write_config(sqlite_config(":memory:"), tmp_path)
    async with running(folder) as app:
        await app.publish("ws", "message", {"id": 5, "text": "a"})
        await asyncio.wait_for(app.memory("ws").drain(), 10)
        for i in range(1, 11):
            await app.publish("ws", "message", {"id": i, "text": f"b{i}"})
        await asyncio.wait_for(app.memory("ws").drain(), 10)
        reasons = [reason for _, _, reason in app.memory("ws").dead_letters]
    assert reasons == [
        "flow 'handle_ws_message': to 'db' failed after 1 try: table 'messages': "
        "UNIQUE constraint failed: messages.id"
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            'type = "database"',
            'driver "sqlite" needs database = "path/to/file.db" (or ":memory:")',
        ),
        (
            'type = "database"\n database = "a.db"\n host = "h"',
            'host is a setting of driver "postgres"; driver "sqlite" takes '
            'database = "path/to/file.db"',
        ),
        (
            'type = "database"\n driver = "postgres"\n'
            ' connection_string = "postgresql://x/y"\n database = "y"',
            "give either connection_string or database, not both",
        ),
    ],
)
def test_settings_are_checked_before_start(settings: str, message: str) -> None:
    text = f'connector "db" {{\n {settings}\n}}\n'
    with pytest.raises(ConfigError) as caught:
        load_test_config(text)
    assert message in str(caught.value)


async def test_a_missing_folder_stops_the_start(tmp_path: Path) -> None:
    folder = write_config(sqlite_config("nowhere/app.db"), tmp_path)
    with pytest.raises(ConnectorError) as caught:
        async with running(folder):
            pass
    assert str(caught.value) == (
        "database 'db': cannot connect (sqlite): the folder of "
        f"{str(folder / 'nowhere' / 'app.db')!r} does not exist; create it first"
    )


def test_a_target_outside_the_grammar_is_refused_at_load() -> None:
    from mycel import ConfigError
    from mycel.testing import load_test_config

    text = """
    connector "bus" { type = "memory" }
    connector "db" {
      type     = "database"
      database = ":memory:"
    }
    flow "f" {
      from { connector = "bus" operation = "a" }
      to   { connector = "db"  target = "messages; DROP TABLE x" }
    }
    """
    with pytest.raises(ConfigError) as info:
        load_test_config(text)
    assert [str(p) for p in info.value.problems] == [
        "test.mycel:9: flow 'f': target 'messages; DROP TABLE x' is not TABLE, "
        "INSERT TABLE or UPSERT TABLE (TABLE: letters, digits and _, optionally "
        "schema.table)."
    ]


async def test_a_batch_of_events_fails_only_its_bad_rows(tmp_path: Path) -> None:
    folder = write_config(sqlite_config("app.db"), tmp_path)
    payloads: list[Any] = [{"id": i, "text": f"t{i}"} for i in range(1, 7)]
    payloads[2] = {"id": 1, "text": "again"}
    payloads[4] = {"id": 5, "txt": "typo"}
    async with running(folder) as app:
        flow = app.runtime.flows["handle_ws_message"]
        outcomes = await flow.process_many([Event(p) for p in payloads])
        registry = app.runtime.metrics.registry
        committed = registry.get_sample_value(
            "mycel_database_rows_total", {"connector": "db"}
        )
        stored = await app.connector("db").deliver_many(
            [Delivery("f", "insert", "messages", p, p, {}) for p in ("x", {"id": 9})]
        )
    assert [None if o is None else str(o) for o in outcomes] == [
        None,
        None,
        "flow 'handle_ws_message': to 'db' failed after 1 try: table 'messages': "
        "UNIQUE constraint failed: messages.id",
        None,
        "flow 'handle_ws_message': to 'db' failed after 1 try: "
        "table 'messages' has no column 'txt'",
        None,
    ]
    assert committed == 4
    assert [None if o is None else str(o) for o in stored] == [
        "table 'messages': the payload must be an object, not str",
        None,
    ]
    with sqlite3.connect(folder / "app.db") as conn:
        rows = conn.execute("SELECT id, text FROM messages ORDER BY id").fetchall()
    assert rows == [(1, "t1"), (2, "t2"), (4, "t4"), (6, "t6"), (9, None)]
