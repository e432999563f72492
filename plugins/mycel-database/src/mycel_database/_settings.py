"""The settings of ``type = "database"`` and of its ``to`` blocks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from mycel import Duration, Settings

__all__ = ["DatabaseSettings", "DatabaseToOptions"]

_POSTGRES_ONLY = ("connection_string", "host", "port", "user", "password")


class DatabaseSettings(Settings):
    """Settings of ``type = "database"``."""

    driver: Literal["postgres", "sqlite"] = "sqlite"
    """``postgres`` (asyncpg) or ``sqlite`` (the embedded default)."""

    connection_string: str | None = None
    """PostgreSQL URL, ``postgresql://user:password@host:5432/db``; the
    password is never shown. Instead of host/port/user/password/database."""

    host: str | None = None
    """PostgreSQL host (default: asyncpg's, from ``PGHOST`` or localhost)."""

    port: int | None = Field(default=None, ge=1, le=65535)
    """PostgreSQL port (default 5432)."""

    user: str | None = None
    """PostgreSQL user."""

    password: SecretStr | None = None
    """PostgreSQL password."""

    database: str | None = Field(default=None, validate_default=True)
    """PostgreSQL: the database name. SQLite: the database file, relative to
    the configuration directory (``":memory:"`` for a private in-memory
    database)."""

    @field_validator("database")
    @classmethod
    def _check_driver(cls, database: str | None, info: ValidationInfo) -> str | None:
        # A field validator rather than a model validator, so that the error
        # points at a setting (and its line) rather than at the whole block.
        data = info.data
        if data.get("driver", "sqlite") == "sqlite":
            given = [name for name in _POSTGRES_ONLY if data.get(name) is not None]
            if given:
                raise ValueError(
                    f'{given[0]} is a setting of driver "postgres"; '
                    'driver "sqlite" takes database = "path/to/file.db"'
                )
            if not database:
                raise ValueError(
                    'driver "sqlite" needs database = "path/to/file.db" (or ":memory:")'
                )
        elif data.get("connection_string") is not None:
            given = [
                name
                for name in ("host", "port", "user", "password")
                if data.get(name) is not None
            ]
            if database is not None:
                given.append("database")
            if given:
                raise ValueError(
                    f"give either connection_string or {given[0]}, not both"
                )
        return database

    pool_size: int = Field(default=10, ge=1, le=1000)
    """PostgreSQL: most connections open at once; also the most batches in
    flight per table."""

    batch_size: int = Field(default=1000, ge=1, le=30_000)
    """Most rows written in one round trip."""

    connect_timeout: Duration = Field(default=10.0, gt=0)
    """How long to wait for a connection."""

    init_sql: str | None = None
    """SQL statements run once at start (``CREATE TABLE IF NOT EXISTS ...``),
    for demos and embedded use."""

    init_sql_file: str | None = None
    """A file of SQL statements run once at start, relative to the
    configuration directory; runs before ``init_sql``."""


class DatabaseToOptions(Settings):
    """Extra attributes of a ``to`` block that writes to a database."""

    extra_keys: Literal["metadata", "error", "ignore"] = "metadata"
    """Payload keys that name no column: ``metadata`` skips those starting
    with ``_`` (event metadata such as CDC's ``_lsn``) and fails the event
    for any other; ``error`` fails it for every one; ``ignore`` skips them
    all."""

    key: list[str] | None = Field(default=None, min_length=1)
    """The conflict columns of ``UPSERT TABLE``; the table's primary key
    when not given."""
