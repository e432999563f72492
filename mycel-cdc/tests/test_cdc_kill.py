"""At-least-once under SIGKILL: 10,000 changes, the consumer killed at random."""

import asyncio
import json
import random
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest
from cdc_support import execute, unique

from mycel.testing import eventually

WORKER = Path(__file__).with_name("cdc_kill_worker.py")
CHANGES = 10_000
TABLES = ("alpha", "beta")


def count_lines(path: Path) -> int:
    """Events delivered so far (cheap: the file is polled while it grows)."""
    if not path.exists():
        return 0
    with path.open("rb") as file:
        return sum(
            chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b"")
        )


def read_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    text = path.read_text()
    # A line cut by SIGKILL mid-write cannot happen (one os.write per line),
    # but the last line may not be complete while the worker is writing.
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


async def write_changes(dsn: str, rng: random.Random) -> dict[str, int]:
    """Commit CHANGES inserts and updates in transactions of 1 to 20."""
    seq = dict.fromkeys(TABLES, 0)
    ids: dict[str, list[int]] = {t: [] for t in TABLES}
    done = 0
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        while done < CHANGES:
            size = min(rng.randint(1, 20), CHANGES - done)
            async with conn.transaction():
                for _ in range(size):
                    table = rng.choice(TABLES)
                    seq[table] += 1
                    if ids[table] and rng.random() < 0.3:
                        row = rng.choice(ids[table])
                        await conn.execute(
                            f"UPDATE {table} SET seq = %s WHERE id = %s",
                            (seq[table], row),
                        )
                    else:
                        cursor = await conn.execute(
                            f"INSERT INTO {table} (seq) VALUES (%s) RETURNING id",
                            (seq[table],),
                        )
                        ids[table].append((await cursor.fetchone())[0])
            done += size
            await asyncio.sleep(0)
    return seq


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_nothing(
    pg_logical_database, tmp_path, record_property
):
    dsn = pg_logical_database
    slot = unique("kill")
    rng = random.Random()
    await execute(
        dsn,
        *(
            f"CREATE TABLE {t} (id serial PRIMARY KEY, seq int NOT NULL)"
            for t in TABLES
        ),
    )
    output = tmp_path / "delivered.jsonl"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "main.mycel").write_text(
        f"""
connector "cdc" {{
  type = "cdc"
  connection_string = "{dsn}"
  tables = ["alpha", "beta"]
  slot_name = "{slot}"
  publication = "{slot}"
  status_interval = "200ms"
}}
connector "file" {{
  type = "jsonfile"
  path = "{output}"
}}
flow "alpha" {{
  from {{ connector = "cdc" operation = "alpha.*" }}
  to {{ connector = "file" }}
}}
flow "beta" {{
  from {{ connector = "cdc" operation = "beta.*" }}
  to {{ connector = "file" }}
}}
"""
    )
    log = (tmp_path / "worker.log").open("w")

    def launch() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / "conf")],
            stdout=log, stderr=log, cwd=WORKER.parent,
        )  # fmt: skip

    # The first run creates slot and publication before anything is written.
    worker = launch()
    await eventually(lambda: "streaming alpha, beta" in _log(tmp_path), timeout=30)
    writer = asyncio.create_task(write_changes(dsn, rng))

    # Kill it whenever it has delivered a random number of further events.
    kills = 0
    try:
        while not writer.done() or kills < 3:
            seen = count_lines(output)
            target = seen + rng.randint(1, 1500)
            await eventually(
                lambda target=target: count_lines(output) >= target or writer.done(),
                timeout=60,
                interval=0.05,
            )
            if writer.done() and kills >= 3:
                break
            worker.send_signal(signal.SIGKILL)
            await asyncio.to_thread(worker.wait)
            kills += 1
            worker = launch()
        expected = await writer

        # Let the last run catch up, then stop it.
        def complete() -> bool:
            if count_lines(output) < CHANGES:
                return False
            got = {(d["table"], d["seq"]) for d in read_lines(output)}
            return all((t, n) in got for t in TABLES for n in range(1, expected[t] + 1))

        await eventually(complete, timeout=120, interval=0.2)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
        log.close()

    lines = read_lines(output)
    delivered = [(d["table"], d["seq"]) for d in lines]
    assert sum(expected.values()) == CHANGES

    # Every change at least once.
    assert set(delivered) == {(t, n) for t in TABLES for n in range(1, expected[t] + 1)}

    # In order per table within each run; each run resumes no later than
    # the first change not yet delivered.
    highest = dict.fromkeys(TABLES, 0)
    runs: dict[object, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    order: list[object] = []
    for d in lines:
        if d["pid"] not in runs:
            order.append(d["pid"])
        runs[d["pid"]][d["table"]].append(d["seq"])
    for pid in order:
        for table, seqs in runs[pid].items():
            assert seqs == sorted(set(seqs)), f"run {pid}: {table} out of order"
            assert seqs[0] <= highest[table] + 1, f"run {pid}: {table} skipped ahead"
            highest[table] = max(highest[table], seqs[-1])

    duplicates = len(delivered) - len(set(delivered))
    record_property("duplicates", duplicates)
    record_property("kills", kills)
    print(
        f"\n{CHANGES} changes, {kills} SIGKILLs, {len(order)} runs: "
        f"{len(delivered)} deliveries, {duplicates} duplicates"
    )
    assert kills >= 3


def _log(tmp_path: Path) -> str:
    path = tmp_path / "worker.log"
    return path.read_text() if path.exists() else ""
