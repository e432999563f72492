"""Several Mycel processes sharing one Redis backplane (issue 11).

Every process here is a real ``mycel run``; they share nothing but Redis on
127.0.0.1:6379 (and, under ``--workers``, the listening ports).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import websockets

from mycel.testing import free_port
from testsupport.base import port_open, service_unavailable
from testsupport.sse import open_stream

CONFIG = """
cluster {
  backplane = "redis://127.0.0.1:6379/0"
  namespace = env("NAMESPACE")
}
service {
  admin_port = env("ADMIN_PORT")
}
connector "api" {
  type = "http"
  port = env("HTTP_PORT")
}
connector "ws" {
  type = "websocket"
  port = env("WS_PORT")
}
connector "sse" {
  type = "sse"
  port = env("SSE_PORT")
}
flow "notify" {
  from { connector = "api"  operation = "POST /notify" }
  to {
    connector = "ws"
    operation = "room:notifications"
    filter    = "input.user_id == context.params.user_id"
  }
  to {
    connector = "sse"
    operation = "stream:notifications"
    filter    = "input.user_id == context.params.user_id"
  }
}
"""


@pytest.fixture
def namespace() -> Iterator[str]:
    if not port_open("127.0.0.1", 6379):
        service_unavailable("Redis on 127.0.0.1:6379")
    name = f"test-cluster-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis()
    keys = client.keys(f"{name}:*")
    if keys:
        client.delete(*keys)
    client.close()


class Node:
    """One ``mycel run`` process (or a ``--workers`` supervisor)."""

    def __init__(self, directory: Path, namespace: str, workers: int = 1) -> None:
        self.ports = {name: free_port() for name in ("http", "ws", "sse", "admin")}
        env = dict(
            os.environ,
            NAMESPACE=namespace,
            HTTP_PORT=str(self.ports["http"]),
            WS_PORT=str(self.ports["ws"]),
            SSE_PORT=str(self.ports["sse"]),
            ADMIN_PORT=str(self.ports["admin"]),
        )
        command = [sys.executable, "-m", "mycel", "run", str(directory)]
        if workers > 1:
            command[4:4] = ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            command, env=env, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        started = 0
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if "started: 3 connectors, 1 flows" in line:
                started += 1
                if started == workers:
                    break
        else:
            raise AssertionError("mycel did not start:\n" + "".join(lines))

    def ws(self, user: int) -> str:
        port = self.ports["ws"]
        return f"ws://127.0.0.1:{port}/ws?user_id={user}&rooms=notifications"

    def sse(self, user: int) -> str:
        port = self.ports["sse"]
        return f"http://127.0.0.1:{port}/events/notifications?user_id={user}"

    def notify(self, n: int, user: int) -> None:
        response = httpx.post(
            f"http://127.0.0.1:{self.ports['http']}/notify",
            json={"n": n, "user_id": user},
        )
        assert response.status_code == 202, response.text

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "main.mycel").write_text(CONFIG)
    return tmp_path


async def joined(url: str) -> websockets.ClientConnection:
    connection = await websockets.connect(url)
    frame = json.loads(await asyncio.wait_for(connection.recv(), 5))
    assert frame == {"type": "joined", "room": "notifications"}
    return connection


async def received(connection: websockets.ClientConnection, count: int) -> list[int]:
    out = []
    for _ in range(count):
        frame = json.loads(await asyncio.wait_for(connection.recv(), 10))
        out.append(frame["data"]["n"])
    return out


@pytest.mark.slow
async def test_three_processes_each_client_gets_each_event_once(
    config_dir: Path, namespace: str
) -> None:
    nodes = [Node(config_dir, namespace) for _ in range(3)]
    try:
        # Two clients per process, users 1 and 2.
        clients = {
            (i, user): await joined(node.ws(user))
            for i, node in enumerate(nodes)
            for user in (1, 2)
        }
        # Events enter through every process in turn.
        for n in range(30):
            await asyncio.to_thread(nodes[n % 3].notify, n, 1 + n % 2)
        for (i, user), connection in clients.items():
            got = await received(connection, 15)
            assert sorted(got) == [n for n in range(30) if 1 + n % 2 == user], (i, user)
        # One more event per user: the next frame each client reads is that
        # one, so nothing arrived twice in between.
        for user in (1, 2):
            await asyncio.to_thread(nodes[0].notify, 100 + user, user)
        for (_, user), connection in clients.items():
            assert await received(connection, 1) == [100 + user]
        for connection in clients.values():
            await connection.close()
    finally:
        codes = [node.stop() for node in nodes]
    assert codes == [0, 0, 0]


@pytest.mark.slow
async def test_sse_client_resumes_on_another_process(
    config_dir: Path, namespace: str
) -> None:
    first, second = Node(config_dir, namespace), Node(config_dir, namespace)
    try:
        async with open_stream(first.sse(1)) as stream:
            await asyncio.to_thread(first.notify, 1, 1)
            seen = await stream.event()
        for n in (2, 3, 4):
            await asyncio.to_thread([first, second][n % 2].notify, n, 1)
        # A client that never left tells when all three are in.
        async with open_stream(second.sse(1), {"Last-Event-ID": seen.id or ""}) as back:
            replayed = [json.loads((await back.event()).data)["n"] for _ in range(3)]
        assert sorted(replayed) == [2, 3, 4]
    finally:
        codes = [first.stop(), second.stop()]
    assert codes == [0, 0]


@pytest.mark.slow
async def test_workers_share_the_port_and_deliver_once(
    config_dir: Path, namespace: str
) -> None:
    node = Node(config_dir, namespace, workers=2)
    try:
        clients = [await joined(node.ws(1)) for _ in range(12)]
        # The kernel spread the connections over both workers.
        counts = []
        async with httpx.AsyncClient() as client:
            for worker in (0, 1):
                port = node.ports["admin"] + worker
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                line = next(
                    ln
                    for ln in text.splitlines()
                    if ln.startswith('mycel_subscribers{connector="ws"}')
                )
                counts.append(int(float(line.split()[-1])))
        assert sum(counts) == 12
        assert min(counts) > 0, counts
        for n in range(5):
            await asyncio.to_thread(node.notify, n, 1)
        for connection in clients:
            assert sorted(await received(connection, 5)) == [0, 1, 2, 3, 4]
        await asyncio.to_thread(node.notify, 99, 1)
        for connection in clients:
            assert await received(connection, 1) == [99]
            await connection.close()
    finally:
        code = node.stop()
    assert code == 0


CDC_CONFIG = """
cluster {
  backplane = "redis://127.0.0.1:6379/0"
  namespace = env("NAMESPACE")
}
connector "cdc" {
  type              = "cdc"
  driver            = "postgres"
  connection_string = env("PG_URL")
  tables            = ["orders"]
}
connector "sink" {
  type              = "database"
  driver            = "postgres"
  connection_string = env("PG_URL")
}
flow "copy" {
  from { connector = "cdc"   operation = "orders.INSERT" }
  to   { connector = "sink"  target = "orders_seen" }
}
"""


def start_node(
    directory: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], Path]:
    log = directory / f"node-{uuid.uuid4().hex[:6]}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mycel", "run", str(directory / "config")],
            env={**os.environ, **env},
            stderr=out,
            text=True,
        )
    return proc, log


async def wait_for_log(log: Path, text: str, timeout: float = 60.0) -> None:
    from mycel.testing import eventually

    await eventually(lambda: text in log.read_text(), timeout=timeout, interval=0.1)


@pytest.mark.slow
async def test_cdc_slot_has_one_reader_and_a_standby_takes_over(
    tmp_path: Path, namespace: str, pg_logical_database: str
) -> None:
    import psycopg

    from mycel.testing import eventually

    with psycopg.connect(pg_logical_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
        conn.execute("CREATE TABLE orders_seen (id integer)")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.mycel").write_text(CDC_CONFIG)
    env = {"NAMESPACE": namespace, "PG_URL": pg_logical_database}

    def insert(ids: range) -> None:
        with psycopg.connect(pg_logical_database, autocommit=True) as conn:
            for n in ids:
                conn.execute("INSERT INTO orders VALUES (%s)", (n,))

    def seen() -> set[int]:
        with psycopg.connect(pg_logical_database) as conn:
            return {row[0] for row in conn.execute("SELECT id FROM orders_seen")}

    leader, leader_log = start_node(tmp_path, env)
    standby = None
    try:
        await wait_for_log(leader_log, "streaming orders through slot")
        standby, standby_log = start_node(tmp_path, env)
        await wait_for_log(standby_log, "is held by another process; standing by")

        await asyncio.to_thread(insert, range(1, 51))
        await eventually(lambda: seen() == set(range(1, 51)), timeout=30)

        leader.kill()  # SIGKILL: no goodbye to PostgreSQL
        leader.wait()
        await asyncio.to_thread(insert, range(51, 101))
        await wait_for_log(standby_log, "took over slot")
        await eventually(lambda: seen() == set(range(1, 101)), timeout=60)
        with psycopg.connect(pg_logical_database) as conn:
            rows = conn.execute("SELECT count(*) FROM orders_seen").fetchone()
        assert rows is not None
        print(f"standby takeover: 100 changes, {rows[0] - 100} delivered twice")
    finally:
        leader.kill()
        if standby is not None:
            standby.send_signal(signal.SIGTERM)
            assert standby.wait(timeout=30) == 0


@pytest.mark.slow
async def test_rabbitmq_sources_share_the_work(
    tmp_path: Path, namespace: str, rabbit: object
) -> None:
    from testsupport.rabbit import RabbitNamespace

    assert isinstance(rabbit, RabbitNamespace)
    config = (
        'cluster {\n  backplane = "redis://127.0.0.1:6379/0"\n'
        f'  namespace = "{namespace}"\n}}\n'
        'service {\n  admin_port = env("ADMIN_PORT")\n}\n'
        + rabbit.connector()
        + 'flow "relay" {\n'
        '  from { connector = "rabbit" operation = "work.in" }\n'
        '  to   { connector = "rabbit" target = "work.out" }\n'
        "}\n"
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "main.mycel").write_text(config)
    out = await rabbit.listen(f"{rabbit.prefix}out", "work.out")
    admins = [free_port(), free_port()]
    nodes = []
    for port in admins:
        proc, log = start_node(tmp_path, {"ADMIN_PORT": str(port)})
        nodes.append(proc)
        await wait_for_log(log, " started: ")
    try:
        for n in range(200):
            await rabbit.publish("work.in", {"n": n})
        got = [
            json.loads((await asyncio.wait_for(out.get(), 30)).body)["n"]
            for _ in range(200)
        ]
        assert sorted(got) == list(range(200))
        # Both processes took part, and together they handled each once.
        handled = []
        async with httpx.AsyncClient() as client:
            for port in admins:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                line = next(
                    ln
                    for ln in text.splitlines()
                    if ln.startswith('mycel_events_in_total{flow="relay"}')
                )
                handled.append(int(float(line.split()[-1])))
        assert sum(handled) == 200
        assert min(handled) > 0, handled
        print(f"rabbitmq work sharing: {handled} messages per process")
    finally:
        for proc in nodes:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in nodes] == [0, 0]
