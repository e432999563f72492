"""A private PostgreSQL cluster with ``wal_level = logical``.

The system server on 127.0.0.1:5432 does not allow logical replication, so
the tests start their own throwaway cluster from the PostgreSQL 15 binaries
(``initdb``/``pg_ctl`` in ``/usr/lib/postgresql/15/bin``, or ``$PG_BIN``):
trust authentication, listening on 127.0.0.1 only, on a free port, with
``wal_level = logical``, 20 replication slots and 20 WAL senders. PostgreSQL
refuses to run as root, so when the tests run as root the cluster runs as
the ``postgres`` OS user in a temporary directory that user owns.

Fixtures, for any distribution's tests:

``pg_logical``
    Session-scoped. The DSN (``postgresql://postgres@127.0.0.1:PORT/postgres``)
    of the shared cluster; the user ``postgres`` is a superuser. Use unique
    table, publication and slot names, or take ``pg_logical_database``.
``pg_logical_database``
    Function-scoped. The DSN of a new, empty database in that cluster;
    dropped afterwards together with its replication slots.
``pg_logical_cluster``
    Session-scoped. The :class:`LogicalCluster` behind ``pg_logical``
    (port, data directory, ``pg_recvlogical`` path). Never stop or restart
    it; start a private one with :func:`start_logical_cluster` for that.

Benchmarks and scripts use :func:`start_logical_cluster` directly::

    cluster = start_logical_cluster()
    try:
        ...  cluster.dsn ...
    finally:
        cluster.stop()

When the cluster cannot start, the fixtures skip locally and fail under CI
(``service_unavailable``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .base import service_unavailable

__all__ = [
    "LogicalCluster",
    "PostgresUnavailable",
    "create_database",
    "drop_database",
    "start_logical_cluster",
]

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))

SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "shared_buffers": "64MB",
}


class PostgresUnavailable(RuntimeError):
    """The private cluster could not be created or started."""


@dataclass
class LogicalCluster:
    """A running private cluster; :meth:`stop` removes it entirely."""

    directory: Path
    port: int
    user: str | None
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.directory / "server.log"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def dsn(self) -> str:
        """The ``postgres`` database, as the superuser ``postgres``."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def pg_recvlogical(self) -> Path:
        return PG_BIN / "pg_recvlogical"

    def _pg_ctl(self, *args: str) -> None:
        command = [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), *args]
        _run(command, self.user)

    def start(self) -> None:
        """Start the server (again); waits until it accepts connections."""
        options = " ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items())
        options += f" -p {self.port} -c unix_socket_directories={self.directory}"
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options)

    def stop(self, mode: str = "fast", *, remove: bool = True) -> None:
        """Stop the server; with ``remove`` delete its files too."""
        with contextlib.suppress(PostgresUnavailable):
            self._pg_ctl("stop", "-w", "-m", mode)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self, mode: str = "fast") -> None:
        """Stop and start the server on the same port, keeping its data."""
        self.stop(mode, remove=False)
        self.start()


def _run(command: list[str], user: str | None) -> None:
    if user is not None:
        command = ["runuser", "-u", user, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PostgresUnavailable(
            f"{' '.join(command)} failed ({result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_logical_cluster() -> LogicalCluster:
    """Create and start a private cluster; raise PostgresUnavailable if not."""
    if not (PG_BIN / "initdb").exists():
        raise PostgresUnavailable(f"no initdb in {PG_BIN} (set PG_BIN)")

    # PostgreSQL refuses root: run it as the postgres OS user in a folder
    # that user owns.
    user: str | None = None
    directory = Path(tempfile.mkdtemp(prefix="mycel-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        try:
            entry = pwd.getpwnam(user)
        except KeyError as exc:
            raise PostgresUnavailable("running as root and no postgres user") from exc
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    directory.chmod(0o700)

    cluster = LogicalCluster(directory, _free_port(), user)
    try:
        _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(cluster.data_dir),
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            user,
        )
        cluster.start()
    except PostgresUnavailable:
        log = cluster.log_file.read_text() if cluster.log_file.exists() else ""
        shutil.rmtree(directory, ignore_errors=True)
        if log:
            raise PostgresUnavailable(f"server log:\n{log}") from None
        raise
    return cluster


def create_database(cluster: LogicalCluster, name: str | None = None) -> str:
    """Create a database in ``cluster``; returns its DSN."""
    name = name or f"t_{uuid.uuid4().hex[:12]}"
    _psql(cluster, "postgres", f'CREATE DATABASE "{name}"')
    return cluster.dsn_for(name)


def drop_database(cluster: LogicalCluster, name: str) -> None:
    """Drop a database with its replication slots and connections."""
    _psql(
        cluster,
        "postgres",
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
        f"WHERE database = '{name}' AND active_pid IS NOT NULL",
        f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        f"WHERE database = '{name}'",
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


def _psql(cluster: LogicalCluster, database: str, *statements: str) -> None:
    command = [
        str(PG_BIN / "psql"),
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        cluster.dsn_for(database),
    ]
    for statement in statements:
        command += ["-c", statement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PostgresUnavailable(f"psql failed: {result.stderr.strip()}")


@pytest.fixture(scope="session")
def pg_logical_cluster() -> Iterator[LogicalCluster]:
    """The shared private cluster with wal_level = logical (never restart it)."""
    try:
        cluster = start_logical_cluster()
    except PostgresUnavailable as exc:
        service_unavailable(f"a private PostgreSQL cluster ({exc})")
        raise  # not reached: service_unavailable skips or fails
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_logical(pg_logical_cluster: LogicalCluster) -> str:
    """DSN of the shared cluster's ``postgres`` database, as a superuser."""
    return pg_logical_cluster.dsn


@pytest.fixture
def pg_logical_database(pg_logical_cluster: LogicalCluster) -> Iterator[str]:
    """DSN of a new database in the shared cluster, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = create_database(pg_logical_cluster, name)
    try:
        yield dsn
    finally:
        with contextlib.suppress(PostgresUnavailable):
            drop_database(pg_logical_cluster, name)
