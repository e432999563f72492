"""Fan-out hub: an indexed equality filter vs evaluating every filter.

10,000 subscribers on one topic, each with ``context.params.user_id``; every
user id is shared by 10 subscribers, so each event matches 10. The same
filter, ``input.user_id == context.params.user_id``, is published once
through the index and once evaluated for every subscriber (the hub's path
for filters it cannot index). Cost per event in microseconds; the issue's
aim is the indexed path at least 50 times cheaper.
"""

from __future__ import annotations

import json
import time

from mycel import Expression, Filter, Hub, Message
from mycel._expr import IndexedEquality

SUBSCRIBERS = 10_000
MATCHING = 10
SOURCE = "input.user_id == context.params.user_id"


def build() -> tuple[Hub, list[object]]:
    hub = Hub("bench")
    subs = []
    for i in range(SUBSCRIBERS):
        user = i // MATCHING
        subs.append(
            hub.subscribe(
                {"params": {"user_id": str(user)}}, ["room"], queue_size=10**9
            )
        )
    return hub, subs


def per_event(hub: Hub, subs: list[object], flt: Filter, events: int) -> float:
    users = SUBSCRIBERS // MATCHING
    delivered = 0
    start = time.perf_counter()
    for n in range(events):
        delivered += hub.publish(
            "room", Message("room", {"user_id": n % users}, n), flt
        )
    elapsed = time.perf_counter() - start
    assert delivered == events * MATCHING, delivered
    for sub in subs:  # empty the queues between runs
        while sub.get_nowait() is not None:  # type: ignore[attr-defined]
            pass
    return elapsed / events * 1e6


def main() -> None:
    hub, subs = build()
    expression = Expression(SOURCE)
    indexed = Filter(expression, IndexedEquality.detect(SOURCE))
    evaluated = Filter(expression, None)
    per_event(hub, subs, indexed, 200)  # warm up
    slow = per_event(hub, subs, evaluated, 20)
    fast = per_event(hub, subs, indexed, 20_000)
    print(
        json.dumps(
            {
                "bench": "hub_index",
                "figure": "cost per event, 10,000 subscribers, 10 matching",
                "unit": "µs/event",
                "value": round(fast, 2),
                "baseline_name": "evaluate every subscriber's filter",
                "baseline": round(slow, 1),
                "ratio": round(slow / fast, 1),
                "higher_is_better": False,
                "aim": ">= 50x cheaper",
                "notes": f"filter {SOURCE!r}",
            }
        )
    )


if __name__ == "__main__":
    main()
