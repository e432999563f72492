"""Ids, the bounded history and the wire encoding, without a server."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from mycel import Expression, Filter, Message
from mycel._expr import IndexedEquality
from mycel_sse._history import (
    Entry,
    EventIds,
    History,
    encode_comment,
    encode_event,
    encode_gap,
    passes,
    replay,
)


def entry(
    number: int, at: float = 0.0, filter: Filter | None = None, **payload: Any
) -> Entry:
    return Entry(number, at, Message(None, payload, payload), filter)


def test_ids_increase_and_parse_back_only_for_this_run() -> None:
    ids = EventIds("cafe0001")
    numbers = [ids.next(), ids.next(), ids.next()]
    assert numbers == [1, 2, 3]
    assert ids.format(3) == "cafe0001-3"
    assert ids.parse("cafe0001-2") == 2
    assert ids.parse(" cafe0001-3 ") == 3
    assert ids.parse("cafe0001-4") is None  # not issued yet
    assert ids.parse("cafe0002-2") is None  # another run
    assert ids.parse("cafe0001-x") is None
    assert ids.parse("") is None


def test_epochs_differ_between_runs() -> None:
    assert EventIds().epoch != EventIds().epoch


def test_history_keeps_the_last_size_events_and_remembers_what_it_dropped() -> None:
    history = History(size=2, ttl=None)
    for number in (1, 3, 4):
        history.append(entry(number))
    gap, kept = history.after(0, now=0.0)
    assert (gap, [e.number for e in kept]) == (True, [3, 4])
    gap, kept = history.after(1, now=0.0)
    assert (gap, [e.number for e in kept]) == (False, [3, 4])
    gap, kept = history.after(3, now=0.0)
    assert (gap, [e.number for e in kept]) == (False, [4])
    assert history.after(4, now=0.0) == (False, [])


def test_history_ttl_expires_old_events_as_a_gap() -> None:
    history = History(size=10, ttl=5.0)
    history.append(entry(1, at=0.0))
    history.append(entry(2, at=4.0))
    gap, kept = history.after(0, now=6.0)
    assert (gap, [e.number for e in kept]) == (True, [2])
    gap, kept = history.after(1, now=6.0)
    assert (gap, [e.number for e in kept]) == (False, [2])
    assert history.after(0, now=10.0) == (True, [])
    assert len(history) == 0


def test_history_of_size_zero_keeps_nothing_but_knows_the_gap() -> None:
    history = History(size=0, ttl=None)
    history.append(entry(7))
    assert history.after(6, now=0.0) == (True, [])
    assert history.after(7, now=0.0) == (False, [])


def test_replay_merges_histories_in_id_order_and_filters_each_event() -> None:
    mine = Filter(
        Expression("input.user_id == context.params.user_id"),
        IndexedEquality.detect("input.user_id == context.params.user_id"),
    )
    big = Filter(Expression("input.total > 10"))
    stream, broadcasts = History(10, None), History(10, None)
    stream.append(entry(2, filter=mine, user_id=1))
    stream.append(entry(3, filter=mine, user_id=2))
    broadcasts.append(entry(4, total=5))
    stream.append(entry(5, filter=big, total=50))
    broadcasts.append(entry(6))
    stream.append(entry(7, filter=big))  # fails to evaluate: counts as false
    context = {"params": {"user_id": "1"}}
    found = replay([stream, broadcasts], 1, context, now=0.0)
    assert found.gap is False
    assert [e.number for e in found.entries] == [2, 4, 5, 6]
    assert found.counts == {"": (4, 1, 1)}


def test_passes_compares_indexed_equality_as_text() -> None:
    source = "input.user_id == context.params.user_id"
    indexed = Filter(Expression(source), IndexedEquality.detect(source))
    message = Message("s", {"user_id": 123}, {})
    assert passes(indexed, message, {"params": {"user_id": "123"}}) is True
    assert passes(indexed, message, {"params": {"user_id": "124"}}) is False
    assert passes(indexed, message, {"params": {}}) is False
    assert passes(indexed, Message("s", {}, {}), {"params": {}}) is None
    assert passes(None, message, {}) is True


def test_event_encoding() -> None:
    assert encode_event("e-1", None, {"a": [1, "é"]}) == (
        b'id: e-1\ndata: {"a":[1,"\xc3\xa9"]}\n\n'
    )
    assert encode_event("e-2", "order", "line\nbreak") == (
        b'id: e-2\nevent: order\ndata: "line\\nbreak"\n\n'
    )
    assert encode_event("e-3", None, {"d": Decimal("1.50")}) == (
        b'id: e-3\ndata: {"d":"1.50"}\n\n'
    )
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        encode_event("e-4", None, {"o": object()})


def test_gap_and_comment_encoding() -> None:
    assert encode_gap("x-1", "expired") == (
        b'event: gap\ndata: {"last_event_id": "x-1", "reason": "expired"}\n\n'
    )
    assert encode_gap("y" * 500, "unknown").count(b"y") == 128
    assert encode_comment("closed: a\nb") == b": closed: a b\n\n"


def test_line_separators_inside_strings_are_escaped() -> None:
    encoded = encode_event("7", None, {"text": "a\u2028b\x85c\u2029d é"})
    assert encoded == (
        b'id: 7\ndata: {"text":"a\\u2028b\\u0085c\\u2029d \xc3\xa9"}\n\n'
    )
    assert encoded.decode().splitlines()[1].startswith("data: ")
