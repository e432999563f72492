"""The pgoutput decoder on hand-built messages (what a server rarely sends)."""

import struct

import pytest

from mycel_cdc import DecodeError, Decoder


def relation(oid: int, name: str, columns: list[tuple[str, int, bool]]) -> bytes:
    body = b"R" + struct.pack(">I", oid) + b"public\0" + name.encode() + b"\0d"
    body += struct.pack(">h", len(columns))
    for column, type_oid, key in columns:
        body += bytes([int(key)]) + column.encode() + b"\0"
        body += struct.pack(">ii", type_oid, -1)
    return body


def tuple_data(*values: bytes | None) -> bytes:
    body = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            body += b"n"
        else:
            body += b"t" + struct.pack(">i", len(value)) + value
    return body


BEGIN = b"B" + struct.pack(">QqI", 0x100, 0, 42)
COMMIT = b"C" + struct.pack(">BQQq", 0, 0x100, 0x128, 0)


def decoder() -> Decoder:
    routes = {"INSERT": ("flow",), "TRUNCATE": ("flow",)}
    return Decoder(lambda schema, name: routes, lambda oid: int if oid == 23 else None)


def test_insert_and_commit_in_order():
    dec = decoder()
    out: list = []
    dec.decode(relation(7, "t", [("id", 23, True), ("note", 25, False)]), 0, out)
    dec.decode(BEGIN, 0x90, out)
    dec.decode(b"I" + struct.pack(">I", 7) + b"N" + tuple_data(b"5", None), 0xA0, out)
    dec.decode(COMMIT, 0x100, out)
    [(event, targets), end] = out
    assert targets == ("flow",)
    assert event == {
        "id": 5, "note": None, "_operation": "INSERT", "_table": "t",
        "_schema": "public", "_commit_lsn": "0/100",
        "_commit_time": "2000-01-01T00:00:00+00:00", "_xid": 42, "_lsn": "0/A0",
        "_old": None, "_unchanged_toast": [],
    }  # fmt: skip
    assert end == 0x128
    assert dec.in_transaction is False


def test_types_origins_and_messages_are_skipped():
    dec = decoder()
    out: list = []
    dec.decode(b"Y" + struct.pack(">I", 99) + b"public\0mood\0", 0, out)
    dec.decode(b"O" + struct.pack(">Q", 5) + b"origin\0", 0, out)
    dec.decode(b"M" + b"\x00" + struct.pack(">Q", 5) + b"p\0" + b"\0\0\0\0", 0, out)
    assert out == []


def test_truncate_of_several_tables_with_options():
    dec = decoder()
    out: list = []
    dec.decode(relation(7, "a", [("id", 23, True)]), 0, out)
    dec.decode(relation(8, "b", [("id", 23, True)]), 0, out)
    dec.decode(BEGIN, 0, out)
    dec.decode(b"T" + struct.pack(">iB", 2, 3) + struct.pack(">II", 7, 8), 0x99, out)
    assert [(e["_table"], e["_cascade"], e["_restart_identity"]) for e, _ in out] == [
        ("a", True, True), ("b", True, True)
    ]  # fmt: skip


def test_unknown_message_is_an_error():
    with pytest.raises(DecodeError) as caught:
        decoder().decode(b"Z\0\0", 0x10, [])
    assert str(caught.value) == "unknown pgoutput message 'Z' at 0x10"


def test_change_for_an_unknown_relation_is_an_error():
    with pytest.raises(DecodeError) as caught:
        decoder().decode(b"I" + struct.pack(">I", 9) + b"N" + tuple_data(b"1"), 0, [])
    assert str(caught.value) == "change for unknown relation 9"


def test_binary_column_is_an_error():
    dec = decoder()
    dec.decode(relation(7, "t", [("id", 23, True)]), 0, [])
    data = b"I" + struct.pack(">I", 7) + b"N" + struct.pack(">h", 1) + b"b"
    with pytest.raises(DecodeError) as caught:
        dec.decode(data + struct.pack(">i", 4) + b"\0\0\0\1", 0, [])
    assert str(caught.value) == "unexpected column kind 'b' in 't'"


def test_unconvertible_value_stays_text():
    dec = decoder()
    out: list = []
    dec.decode(relation(7, "t", [("id", 23, True)]), 0, out)
    dec.decode(b"I" + struct.pack(">I", 7) + b"N" + tuple_data(b"x1"), 0, out)
    assert out[0][0]["id"] == "x1"
