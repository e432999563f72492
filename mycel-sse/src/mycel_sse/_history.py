"""Event ids, the bounded replay history, and the wire encoding of events.

Ids
    Every event published through one connector gets the next number of a
    single sequence, and its id is ``EPOCH-NUMBER``: ``EPOCH`` is 8 hex
    digits drawn when the connector starts, ``NUMBER`` counts from 1. One
    sequence serves every stream and the broadcasts, so the numbers a client
    of one stream sees increase (with gaps where other streams' events were
    numbered), and the one ``Last-Event-ID`` a browser sends back orders its
    stream's events and the broadcasts alike: replay is "everything of my
    stream or broadcast numbered above N". The epoch tells ids of an earlier
    run apart, whose history is gone.

Replay and the gap signal
    Each stream, and the broadcasts, keep their last ``history_size``
    events (for at most ``history_ttl``), together with the filter of the
    ``to`` block that produced each, so that replay passes a reconnecting
    client only what its live subscription would have passed. When an event
    the client may have missed is no longer kept, or the id is not one of
    this run, the client first gets one ``gap`` event (see :func:`encode_gap`)
    and then whatever is still kept.

"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any
from uuid import UUID

from mycel import ExpressionError, Filter, Message

from ._settings import GAP_EVENT

__all__ = [
    "Entry",
    "EventIds",
    "History",
    "Replay",
    "encode_comment",
    "encode_event",
    "encode_gap",
    "passes",
    "replay",
]


class EventIds:
    """The connector's id sequence: ``EPOCH-NUMBER``; see the module doc.

    ``strict`` refuses numbers above the last one given out; a cluster turns
    it off, because another process may have given out a number this one
    has not seen yet.

    """

    def __init__(self, epoch: str | None = None, *, strict: bool = True) -> None:
        self.epoch = epoch or secrets.token_hex(4)
        self.last = 0
        self.strict = strict

    def next(self) -> int:
        self.last += 1
        return self.last

    def format(self, number: int) -> str:
        return f"{self.epoch}-{number}"

    def parse(self, text: str) -> int | None:
        """The number of an id of this run, or None for any other text."""
        epoch, _, number = text.strip().partition("-")
        if epoch != self.epoch or not number.isdigit():
            return None
        value = int(number)
        return value if value <= self.last or not self.strict else None


@dataclass(slots=True)
class Entry:
    """One published event, as kept for replay."""

    number: int
    at: float
    message: Message
    filter: Filter | None


class History:
    """The last events of one stream (or of the broadcasts), bounded.

    ``dropped`` is the highest number pushed out so far: a client whose
    last id is below it may have missed an event that replay cannot give.

    """

    __slots__ = ("_entries", "_numbers", "dropped", "size", "ttl")

    def __init__(self, size: int, ttl: float | None) -> None:
        self.size = size
        self.ttl = ttl
        self.dropped = 0
        self._entries: deque[Entry] = deque()
        self._numbers: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        if self.size == 0:
            self.dropped = entry.number
            return
        self.expire(entry.at)
        if len(self._entries) >= self.size:
            self._pop()
        self._entries.append(entry)
        self._numbers.append(entry.number)

    def expire(self, now: float) -> None:
        """Drop entries older than ``ttl``."""
        if self.ttl is None:
            return
        cutoff = now - self.ttl
        while self._entries and self._entries[0].at < cutoff:
            self._pop()

    def _pop(self) -> None:
        self.dropped = self._entries.popleft().number
        self._numbers.popleft()

    def after(self, number: int, now: float) -> tuple[bool, list[Entry]]:
        """Whether events after ``number`` were lost, and those still kept.

        ``now`` is a :func:`time.monotonic` reading, for ``ttl``.

        """
        self.expire(now)
        start = bisect.bisect_right(self._numbers, number)
        kept = list(itertools.islice(self._entries, start, None))
        return self.dropped > number, kept


def passes(
    filter: Filter | None, message: Message, context: Mapping[str, Any]
) -> bool | None:
    """Whether ``filter`` lets ``message`` through to a client with ``context``.

    The same decision the hub takes for a live event: an indexed equality
    compares texts, any other filter is evaluated. None (false) when the
    evaluation failed, so that callers can count it.

    """
    if filter is None:
        return True
    if filter.indexed is not None:
        wanted = filter.indexed.context_value(context)
        value = filter.indexed.event_value(message.input, message.payload)
        if value is None:
            return None
        return wanted is not None and wanted == value
    variables = {"input": message.input, "output": message.payload, "context": context}
    try:
        return filter.expression.evaluate(variables) is True
    except ExpressionError:
        return None


@dataclass
class Replay:
    """What a reconnecting client gets from the history.

    ``gap`` tells whether some event after its last id is no longer kept;
    ``entries`` are the kept ones its filters pass, in id order; ``counts``
    maps each flow to (sent, filtered, failed) for the metrics.

    """

    gap: bool
    entries: list[Entry]
    counts: dict[str, tuple[int, int, int]]


def replay(
    histories: Iterable[History],
    number: int,
    context: Mapping[str, Any],
    now: float | None = None,
) -> Replay:
    """Kept events after ``number`` of ``histories`` for a client; see Replay."""
    now = time.monotonic() if now is None else now
    gap = False
    lists = []
    for history in histories:
        lost, kept = history.after(number, now)
        gap = gap or lost
        lists.append(kept)

    entries: list[Entry] = []
    counts: dict[str, tuple[int, int, int]] = {}
    for entry in heapq.merge(*lists, key=lambda entry: entry.number):
        verdict = passes(entry.filter, entry.message, context)
        sent, filtered, failed = counts.get(entry.message.flow, (0, 0, 0))
        if verdict:
            entries.append(entry)
            sent += 1
        elif verdict is None:
            failed += 1
        else:
            filtered += 1
        counts[entry.message.flow] = (sent, filtered, failed)
    return Replay(gap, entries, counts)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | time_of_day):
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_UNSPLITTABLE = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def encode_event(event_id: str, event: str | None, payload: Any) -> bytes:
    """One event on the wire: ``id``, optional ``event``, JSON ``data``.

    Raise TypeError or ValueError when the payload is not JSON-able.

    """
    data = json.dumps(
        payload,
        ensure_ascii=False,
        separators=(",", ":"),
        allow_nan=False,
        default=_json_default,
    )
    if not data.isascii():
        # Line separators other than CR and LF are valid inside JSON text,
        # but clients that split lines like str.splitlines() (httpx, many
        # hand-written readers) would cut the event there.
        data = data.translate(_UNSPLITTABLE)
    head = (
        f"id: {event_id}\n" if event is None else (f"id: {event_id}\nevent: {event}\n")
    )
    return f"{head}data: {data}\n\n".encode()


def encode_gap(last_event_id: str, reason: str) -> bytes:
    """The signal that replay cannot give everything after an id.

    ``reason`` is ``"expired"`` (events after that id were pushed out of
    the history) or ``"unknown"`` (not an id of this run: the server
    restarted, or the id was never ours). The event has no ``id`` field, so
    the client's last id stays where it was.

    """
    data = json.dumps({"last_event_id": last_event_id[:128], "reason": reason})
    return f"event: {GAP_EVENT}\ndata: {data}\n\n".encode()


def encode_comment(text: str) -> bytes:
    """A comment line, ignored by clients (heartbeats, close reasons)."""
    return f": {' '.join(text.splitlines())}\n\n".encode()
