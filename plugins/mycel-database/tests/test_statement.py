"""Target grammar and the SQL written from it."""

from __future__ import annotations

import pytest

import mycel_database
from mycel_database._statement import Statement, TableName, TargetSpec, parse_target


@pytest.mark.parametrize(
    ("target", "spec"),
    [
        ("messages", TargetSpec(None, TableName(None, "messages"))),
        ("INSERT audit_log", TargetSpec("insert", TableName(None, "audit_log"))),
        ("upsert  app.Users ", TargetSpec("upsert", TableName("app", "Users"))),
        ("_t1", TargetSpec(None, TableName(None, "_t1"))),
    ],
)
def test_targets_that_parse(target: str, spec: TargetSpec) -> None:
    assert parse_target(target) == spec


@pytest.mark.parametrize(
    "target",
    ["", "1abc", 'a"b', "a;drop", "DELETE t", "a.b.c", "a b", "x" * 64],
)
def test_targets_that_do_not_parse(target: str) -> None:
    with pytest.raises(ValueError, match="is not TABLE, INSERT TABLE or UPSERT TABLE"):
        parse_target(target)


def test_insert_sql_quotes_every_identifier() -> None:
    statement = Statement(TableName("app", "log"), "insert", ("id", "_old"))
    assert statement.sql("dollar") == (
        'INSERT INTO "app"."log" ("id", "_old") VALUES ($1, $2)'
    )
    assert (
        statement.sql("qmark") == 'INSERT INTO "app"."log" ("id", "_old") VALUES (?, ?)'
    )


def test_upsert_sql_updates_the_other_columns() -> None:
    statement = Statement(TableName(None, "p"), "upsert", ("sku", "price"), ("sku",))
    assert statement.sql("dollar") == (
        'INSERT INTO "p" ("sku", "price") VALUES ($1, $2) '
        'ON CONFLICT ("sku") DO UPDATE SET "price" = excluded."price"'
    )
    only_key = Statement(TableName(None, "p"), "upsert", ("sku",), ("sku",))
    assert only_key.sql("qmark").endswith('ON CONFLICT ("sku") DO NOTHING')


def test_all_is_sorted_and_complete() -> None:
    assert mycel_database.__all__ == sorted(mycel_database.__all__)
    public = {
        name
        for name, value in vars(mycel_database).items()
        if not name.startswith("_")
        and not isinstance(value, type(mycel_database))
        and name != "annotations"
    }
    assert public == set(mycel_database.__all__)
