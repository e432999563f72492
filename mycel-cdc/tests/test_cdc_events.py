"""Events from a real PostgreSQL: every type, replica identities, TOAST."""

import math
import re
from decimal import Decimal

from cdc_support import cdc_block, execute, flow, take, unique, without_meta

from mycel.testing import running

TYPES_TABLE = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE everything (
    id int PRIMARY KEY, small smallint, big bigint, flt real,
    dbl double precision, num numeric(12, 4), flag boolean, txt text,
    vc varchar(10), ch char(3), uid uuid, js json, jsb jsonb, d date,
    t time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
    ints int[], texts text[], nums numeric[], grid int[][],
    stamps timestamptz[], jsons jsonb[], nothing text, byt bytea,
    feeling mood, dom positive, doms positive[], feelings mood[]
)
"""

TYPES_ROW = r"""
INSERT INTO everything VALUES (
    1, 2, 9007199254740993, 1.5, 0.1, 12.34, true, 'héllo "quoted"',
    'abc', 'ab', '6F1C2B0E-8D4A-4E7B-9C3D-2A1B0C9D8E7F',
    '{"a": [1, 2.5, null]}', '{"b": {"c": "d"}, "a": 1}', '2024-02-29',
    '13:45:06.5', '13:45:06+02', '2024-02-29 13:45:06.123456',
    '2024-02-29 13:45:06+02', '1 day 2 hours', '{1,2,NULL}',
    ARRAY['a', 'b,c', 'NULL', '"q"', NULL], '{1.50,2}', '{{1,2},{3,4}}',
    ARRAY['2024-01-01 00:00:00+00'::timestamptz], ARRAY['{"a":1}'::jsonb, '[1]'],
    NULL, '\x0102ff', 'happy', 5, '{6,7}', '{sad,happy}'
)
"""


async def test_every_type_keeps_its_value(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("types")
    await execute(dsn, TYPES_TABLE)
    config = cdc_block(dsn, ["everything"], slot) + flow(
        "f", "everything.INSERT", "out"
    )
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(dsn, TYPES_ROW)
        [event] = await take(out, 1)

    assert without_meta(event) == {
        "id": 1,
        "small": 2,
        "big": 9007199254740993,
        "flt": 1.5,
        "dbl": 0.1,
        "num": Decimal("12.3400"),
        "flag": True,
        "txt": 'héllo "quoted"',
        "vc": "abc",
        "ch": "ab ",
        "uid": "6f1c2b0e-8d4a-4e7b-9c3d-2a1b0c9d8e7f",
        "js": {"a": [1, 2.5, None]},
        "jsb": {"a": 1, "b": {"c": "d"}},
        "d": "2024-02-29",
        "t": "13:45:06.5",
        "ttz": "13:45:06+02:00",
        "ts": "2024-02-29T13:45:06.123456",
        "tstz": "2024-02-29T11:45:06+00:00",
        "iv": "P1DT2H",
        "ints": [1, 2, None],
        "texts": ["a", "b,c", "NULL", '"q"', None],
        "nums": [Decimal("1.50"), Decimal("2")],
        "grid": [[1, 2], [3, 4]],
        "stamps": ["2024-01-01T00:00:00+00:00"],
        "jsons": [{"a": 1}, [1]],
        "nothing": None,
        "byt": "\\x0102ff",
        "feeling": "happy",
        "dom": 5,
        "doms": [6, 7],
        "feelings": ["sad", "happy"],
        "_operation": "INSERT",
        "_table": "everything",
        "_schema": "public",
        "_old": None,
        "_unchanged_toast": [],
    }
    assert str(event["num"]) == "12.3400"
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", event["_lsn"])
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", event["_commit_lsn"])
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", event["_commit_time"]
    )
    assert isinstance(event["_xid"], int)


async def test_special_values_are_kept(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("special")
    await execute(
        dsn,
        "CREATE TABLE special (id int PRIMARY KEY, f float8, r real, n numeric, "
        "d date, ts timestamptz)",
    )
    config = cdc_block(dsn, ["special"], slot) + flow("f", "special.*", "out")
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(
            dsn,
            "INSERT INTO special VALUES (1, 'NaN', '-Infinity', 'NaN', 'infinity', "
            "'-infinity')",
        )
        [event] = await take(out, 1)
    assert math.isnan(event["f"])
    assert event["r"] == -math.inf
    assert event["n"].is_nan()
    assert (event["d"], event["ts"]) == ("infinity", "-infinity")


async def test_default_identity_old_holds_the_key_only(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("ident")
    await execute(
        dsn,
        "CREATE TABLE users (id int PRIMARY KEY, name text, email text)",
        "INSERT INTO users VALUES (1, 'ann', 'ann@example.com')",
    )
    config = cdc_block(dsn, ["users"], slot) + flow("f", "users.*", "out")
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(
            dsn,
            "UPDATE users SET name = 'anna' WHERE id = 1",
            "UPDATE users SET id = 2 WHERE id = 1",
            "DELETE FROM users WHERE id = 2",
        )
        events = [without_meta(e) for e in await take(out, 3)]

    common = {"_table": "users", "_schema": "public", "_unchanged_toast": []}
    assert events == [
        {"id": 1, "name": "anna", "email": "ann@example.com",
         "_operation": "UPDATE", "_old": {"id": 1}, **common},
        {"id": 2, "name": "anna", "email": "ann@example.com",
         "_operation": "UPDATE", "_old": {"id": 1}, **common},
        {"id": 2, "_operation": "DELETE", "_old": {"id": 2}, **common},
    ]  # fmt: skip


async def test_full_identity_old_holds_the_whole_row(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("full")
    await execute(
        dsn,
        "CREATE TABLE users (id int PRIMARY KEY, name text, email text)",
        "ALTER TABLE users REPLICA IDENTITY FULL",
        "INSERT INTO users VALUES (1, 'ann', 'ann@example.com')",
    )
    config = cdc_block(dsn, ["users"], slot) + flow("f", "users.*", "out")
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(
            dsn,
            "UPDATE users SET name = 'anna' WHERE id = 1",
            "DELETE FROM users WHERE id = 1",
        )
        events = [without_meta(e) for e in await take(out, 2)]

    common = {"_table": "users", "_schema": "public", "_unchanged_toast": []}
    assert events == [
        {"id": 1, "name": "anna", "email": "ann@example.com",
         "_operation": "UPDATE",
         "_old": {"id": 1, "name": "ann", "email": "ann@example.com"}, **common},
        {"id": 1, "name": "anna", "email": "ann@example.com",
         "_operation": "DELETE",
         "_old": {"id": 1, "name": "anna", "email": "ann@example.com"}, **common},
    ]  # fmt: skip


BIG = "".join(f"{i:05d}" for i in range(4000))  # 20 kB, stored out of line


async def test_unchanged_toast_column_is_left_out_and_named(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("toast")
    await execute(
        dsn,
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text)",
        "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
        f"INSERT INTO docs VALUES (1, 'first', '{BIG}')",
    )
    config = cdc_block(dsn, ["docs"], slot) + flow("f", "docs.UPDATE", "out")
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(dsn, "UPDATE docs SET title = 'second' WHERE id = 1")
        [event] = await take(out, 1)
    assert "body" not in event
    assert event["_unchanged_toast"] == ["body"]
    assert (event["id"], event["title"], event["_old"]) == (1, "second", {"id": 1})


async def test_full_identity_fills_in_the_unchanged_toast_column(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("toastfull")
    await execute(
        dsn,
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text)",
        "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
        "ALTER TABLE docs REPLICA IDENTITY FULL",
        f"INSERT INTO docs VALUES (1, 'first', '{BIG}')",
    )
    config = cdc_block(dsn, ["docs"], slot) + flow("f", "docs.UPDATE", "out")
    async with running(config) as app:
        out = app.listen("mem", "out")
        await execute(dsn, "UPDATE docs SET title = 'second' WHERE id = 1")
        [event] = await take(out, 1)
    assert event["body"] == BIG
    assert event["_unchanged_toast"] == []
    assert event["_old"] == {"id": 1, "title": "first", "body": BIG}


async def test_operations_route_each_change_to_its_flows(pg_logical_database):
    dsn = pg_logical_database
    slot = unique("route")
    await execute(
        dsn,
        "CREATE TABLE orders (id int PRIMARY KEY, total int)",
        "CREATE SCHEMA shop",
        "CREATE TABLE shop.products (id int PRIMARY KEY)",
    )
    config = (
        cdc_block(dsn, ["orders", "shop.products"], slot)
        + flow("inserts", "orders.INSERT", "inserts")
        + flow("everything", "orders.*", "everything")
        + flow("truncates", "orders.TRUNCATE", "truncates")
        + flow("products", "shop.products.DELETE", "products")
    )
    async with running(config) as app:
        inserts = app.listen("mem", "inserts")
        everything = app.listen("mem", "everything")
        truncates = app.listen("mem", "truncates")
        products = app.listen("mem", "products")
        await execute(
            dsn,
            "INSERT INTO shop.products VALUES (7)",
            "INSERT INTO orders VALUES (1, 10)",
            "UPDATE orders SET total = 11",
            "DELETE FROM orders",
            "DELETE FROM shop.products",
            "TRUNCATE orders",
        )
        [product] = await take(products, 1)
        [truncate] = await take(truncates, 1)
        [insert] = await take(inserts, 1)
        changes = await take(everything, 3)

    assert (product["id"], product["_table"], product["_schema"]) == (
        7,
        "products",
        "shop",
    )
    assert without_meta(truncate) == {
        "_operation": "TRUNCATE", "_table": "orders", "_schema": "public",
        "_old": None, "_unchanged_toast": [], "_cascade": False,
        "_restart_identity": False,
    }  # fmt: skip
    assert (insert["_operation"], insert["total"]) == ("INSERT", 10)
    assert [(c["_operation"], c.get("total")) for c in changes] == [
        ("INSERT", 10),
        ("UPDATE", 11),
        ("DELETE", None),
    ]
    # Nothing else arrived: the truncate is not part of orders.*.
    assert inserts.empty() and everything.empty() and products.empty()
