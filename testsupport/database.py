"""PostgreSQL for the database target's tests: a fresh database per test.

Uses the system server at ``MYCEL_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth). Each test
that asks for ``pg_database`` gets a database of its own, dropped after it,
so that tests of several helpers can share the server.

"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from testsupport.base import port_open, service_unavailable

ADMIN_URL = os.environ.get(
    "MYCEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    try:
        import asyncpg
    except ImportError:
        service_unavailable("asyncpg (pip install mycel-database)")
    parts = urlsplit(ADMIN_URL)
    if not port_open(parts.hostname or "127.0.0.1", parts.port or 5432):
        service_unavailable(f"PostgreSQL at {parts.hostname}:{parts.port}")
    name = f"mycel_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    try:
        yield _with_database(ADMIN_URL, name)
    finally:
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
