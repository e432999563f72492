"""Message bodies to events and payloads to bodies."""

from __future__ import annotations

import datetime
import uuid
from decimal import Decimal

import pytest

from mycel_rabbit import decode_body, encode_payload
from mycel_rabbit._codec import plain


def test_decode_any_json_value() -> None:
    assert decode_body(b'{"channel_id": 7, "text": "h\xc3\xa9"}') == {
        "channel_id": 7,
        "text": "hé",
    }
    assert decode_body(b"[1, 2]") == [1, 2]


def test_decode_not_json_says_why() -> None:
    with pytest.raises(ValueError) as caught:
        decode_body(b"not json")
    assert str(caught.value) == (
        "body is not JSON: Expecting value: line 1 column 1 (char 0)"
    )


def test_decode_not_utf8_says_why() -> None:
    with pytest.raises(ValueError) as caught:
        decode_body(b'{"a": "\xff"}')
    assert str(caught.value) == (
        "body is not UTF-8 text: 'utf-8' codec can't decode byte 0xff in "
        "position 7: invalid start byte"
    )


def test_encode_database_types() -> None:
    payload = {
        "n": Decimal("12"),
        "price": Decimal("9.95"),
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "day": datetime.date(2026, 1, 2),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "raw": b"\x00\x01",
        "text": "é",
    }
    assert (
        encode_payload(payload)
        == (
            '{"n":12,"price":9.95,"at":"2026-01-02T03:04:05+00:00",'
            '"day":"2026-01-02","id":"12345678-1234-5678-1234-567812345678",'
            '"raw":"AAE=","text":"é"}'
        ).encode()
    )


def test_encode_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError) as caught:
        encode_payload({"x": object})
    assert str(caught.value) == ("type value <class 'object'> is not JSON serialisable")
    with pytest.raises(ValueError) as nan:
        encode_payload({"x": float("nan")})
    # The wording's tail differs between Python versions.
    assert str(nan.value).startswith("Out of range float values are not JSON compliant")


def test_header_values_become_plain() -> None:
    assert plain(
        {
            "a": b"bytes",
            "b": Decimal("1.5"),
            "c": [1, b"x"],
            "d": datetime.datetime(2026, 1, 2, 3, 4, 5),
        }
    ) == {"a": "bytes", "b": 1.5, "c": [1, "x"], "d": "2026-01-02T03:04:05"}


def test_headers_read_back_can_be_written_again() -> None:
    import struct

    from pamqp import decode, encode

    from mycel_rabbit._codec import encodable

    # A long-string header that is not UTF-8, as another client may send it:
    # the decoder gives bytes, which the encoder refuses.
    raw = b"S" + struct.pack(">I", 1) + b"\xff"
    table = b"\x01k" + raw
    _, headers = decode.field_table(struct.pack(">I", len(table)) + table)
    assert headers == {"k": b"\xff"}
    with pytest.raises(TypeError):
        encode.field_table(headers)

    copy = encodable({**headers, "n": [b"a", 1], "t": {"x": b"y"}})
    assert copy == {
        "k": bytearray(b"\xff"),
        "n": [bytearray(b"a"), 1],
        "t": {"x": bytearray(b"y")},
    }
    _, again = decode.field_table(encode.field_table(copy))
    assert again["k"] == bytearray(b"\xff")
