"""Helpers shared by the mycel-cdc tests (not a pytest plugin)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def execute(dsn: str, *statements: str) -> None:
    """Run each statement in its own autocommitted transaction."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


async def query(dsn: str, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(statement, args or None)
        return await cursor.fetchall()


async def slot_confirmed(dsn: str, slot: str) -> int:
    """The slot's confirmed_flush_lsn on the server, as an integer."""
    from mycel_cdc import parse_lsn

    rows = await query(
        dsn,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
        "WHERE slot_name = %s",
        slot,
    )
    return parse_lsn(rows[0][0])


def cdc_block(dsn: str, tables: list[str], slot: str, **extra: str) -> str:
    listed = ", ".join(f'"{t}"' for t in tables)
    lines = [
        'connector "cdc" {',
        '  type = "cdc"',
        '  driver = "postgres"',
        f'  connection_string = "{dsn}"',
        f"  tables = [{listed}]",
        f'  slot_name = "{slot}"',
        f'  publication = "{slot}"',
    ]
    lines += [f'  {key} = "{value}"' for key, value in extra.items()]
    return "\n".join([*lines, "}", 'connector "mem" { type = "memory" }', ""])


def flow(name: str, operation: str, target: str, extra: str = "") -> str:
    return (
        f'flow "{name}" {{\n'
        f'  from {{ connector = "cdc" operation = "{operation}" }}\n'
        f"{extra}"
        f'  to {{ connector = "mem" target = "{target}" }}\n'
        "}\n"
    )


async def take(
    queue: asyncio.Queue[Any], count: int, timeout: float = 10.0
) -> list[Any]:
    """The next ``count`` payloads from a memory listener queue."""
    items = []
    for _ in range(count):
        _, payload = await asyncio.wait_for(queue.get(), timeout)
        items.append(payload)
    return items


META = ("_lsn", "_commit_lsn", "_commit_time", "_xid")


def without_meta(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload minus the fields that differ per run (LSNs, times, xid)."""
    return {k: v for k, v in payload.items() if k not in META}


# -- a target a test controls ------------------------------------------------

import mycel  # noqa: E402


class GateSettings(mycel.Settings):
    failures: int = 0
    """Transient failures of each event before it is accepted."""


class GateTarget(mycel.Connector):
    """Records deliveries; can hold them (``open``) or fail them."""

    type_name = "gate"
    settings_model = GateSettings
    target_operations = (mycel.Operation("deliver", "record the payload"),)
    default_operation = "deliver"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open = asyncio.Event()
        self.open.set()
        self.arrived: asyncio.Queue[Any] = asyncio.Queue()
        self.delivered: asyncio.Queue[Any] = asyncio.Queue()
        self.tries: dict[Any, int] = {}

    async def deliver(self, delivery: mycel.Delivery) -> None:
        payload = delivery.payload
        self.arrived.put_nowait(payload)
        await self.open.wait()
        key = (payload.get("_lsn"), payload.get("id"))
        self.tries[key] = self.tries.get(key, 0) + 1
        assert isinstance(self.settings, GateSettings)
        if self.tries[key] <= self.settings.failures:
            raise mycel.DeliveryError(f"refused try {self.tries[key]}")
        self.delivered.put_nowait(payload)


class _GatePlugin:
    @mycel.hookimpl
    def mycel_connector_types(self) -> list[type[mycel.Connector]]:
        return [GateTarget]


gate_plugin = _GatePlugin()
