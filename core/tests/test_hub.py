"""The fan-out hub: topics, filters, the index, slow consumers."""

from __future__ import annotations

import asyncio

import pytest

from mycel import Expression, Filter, Hub, Message, SubscriberClosed
from mycel._expr import IndexedEquality
from mycel._metrics import Metrics


def make_filter(source: str) -> Filter:
    return Filter(Expression(source), IndexedEquality.detect(source))


def drain(sub: object) -> list[object]:
    out = []
    while (message := sub.get_nowait()) is not None:  # type: ignore[attr-defined]
        out.append(message.payload)
    return out


def test_topic_publish_reaches_only_members() -> None:
    hub = Hub("ws")
    a = hub.subscribe({}, ["room1"])
    b = hub.subscribe({}, ["room2"])
    assert hub.publish("room1", Message("room1", {}, "x")) == 1
    assert drain(a) == ["x"]
    assert drain(b) == []


def test_broadcast_reaches_everyone() -> None:
    hub = Hub("ws")
    a = hub.subscribe({}, ["room1"])
    b = hub.subscribe({})
    assert hub.publish(None, Message(None, {}, "all")) == 2
    assert drain(a) == ["all"]
    assert drain(b) == ["all"]


def test_publish_to_empty_topic_delivers_nothing() -> None:
    hub = Hub("ws")
    assert hub.publish("nobody", Message("nobody", {}, "x")) == 0


def test_join_and_leave() -> None:
    hub = Hub("ws")
    sub = hub.subscribe({})
    hub.join(sub, "r")
    assert hub.topic_size("r") == 1
    hub.leave(sub, "r")
    assert hub.topic_size("r") == 0
    assert hub.publish("r", Message("r", {}, "x")) == 0


@pytest.mark.parametrize("indexed", [True, False])
def test_room_filter_skips_other_users(indexed: bool) -> None:
    hub = Hub("ws")
    alice = hub.subscribe({"params": {"user_id": "123"}}, ["n"])
    bob = hub.subscribe({"params": {"user_id": "456"}}, ["n"])
    anonymous = hub.subscribe({"params": {}}, ["n"])
    source = "input.user_id == context.params.user_id"
    flt = make_filter(source) if indexed else Filter(Expression(source), None)
    assert (flt.indexed is not None) is indexed
    # A number in the event matches the same text in the query string.
    assert hub.publish("n", Message("n", {"user_id": 123}, "for alice"), flt) == 1
    assert hub.publish("n", Message("n", {"user_id": "456"}, "for bob"), flt) == 1
    assert drain(alice) == ["for alice"]
    assert drain(bob) == ["for bob"]
    assert drain(anonymous) == []


def test_indexed_filter_respects_topic_membership() -> None:
    hub = Hub("ws")
    in_room = hub.subscribe({"params": {"user_id": "1"}}, ["a"])
    other_room = hub.subscribe({"params": {"user_id": "1"}}, ["b"])
    flt = make_filter("input.user_id == context.params.user_id")
    assert hub.publish("a", Message("a", {"user_id": 1}, "x"), flt) == 1
    assert drain(in_room) == ["x"]
    assert drain(other_room) == []


def test_index_is_updated_when_subscribers_leave() -> None:
    hub = Hub("ws")
    hub.add_index(("params", "user_id"))
    sub = hub.subscribe({"params": {"user_id": "7"}}, ["a"])
    sub.close("bye")
    flt = make_filter("input.user_id == context.params.user_id")
    assert hub.publish("a", Message("a", {"user_id": 7}, "x"), flt) == 0
    assert hub._indexes[("params", "user_id")] == {}


def test_filter_errors_count_as_false_and_are_counted() -> None:
    metrics = Metrics()
    hub = Hub("ws", metrics)
    with_field = hub.subscribe({"params": {"level": "2"}}, ["t"])
    without = hub.subscribe({"params": {}}, ["t"])
    flt = Filter(Expression("int(context.params.level) > input.min"))
    message = Message("t", {"min": 1}, "x", flow="f")
    assert hub.publish("t", message, flt) == 1
    assert drain(with_field) == ["x"]
    assert drain(without) == []
    errors = metrics.registry.get_sample_value(
        "mycel_filter_errors_total", {"flow": "f", "connector": "ws"}
    )
    assert errors == 1.0


def test_indexed_filter_on_event_without_the_field_fails_closed() -> None:
    metrics = Metrics()
    hub = Hub("ws", metrics)
    sub = hub.subscribe({"params": {"user_id": "1"}}, ["t"])
    flt = make_filter("input.user_id == context.params.user_id")
    assert hub.publish("t", Message("t", {}, "x", flow="f"), flt) == 0
    assert drain(sub) == []
    errors = metrics.registry.get_sample_value(
        "mycel_filter_errors_total", {"flow": "f", "connector": "ws"}
    )
    assert errors == 1.0


def test_slow_subscriber_is_closed_and_others_keep_receiving() -> None:
    closed: list[tuple[int, str]] = []
    hub = Hub("ws")
    slow = hub.subscribe(
        {}, ["t"], queue_size=2, on_close=lambda s, why: closed.append((s.id, why))
    )
    fast = hub.subscribe({}, ["t"], queue_size=100)
    for i in range(5):
        hub.publish("t", Message("t", {}, i))
        drain(fast) if i == 4 else None
    assert slow.closed
    assert closed == [(slow.id, "slow consumer: send queue full (2 messages)")]
    assert hub.topic_size("t") == 1
    assert hub.publish("t", Message("t", {}, "after")) == 1


async def test_get_waits_for_a_message_and_raises_once_closed() -> None:
    hub = Hub("ws")
    sub = hub.subscribe({}, ["t"])
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    hub.publish("t", Message("t", {}, "hello"))
    message = await asyncio.wait_for(waiter, 1)
    assert message.payload == "hello"
    pending = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    sub.close("server shutting down")
    with pytest.raises(SubscriberClosed) as info:
        await asyncio.wait_for(pending, 1)
    assert info.value.reason == "server shutting down"


async def test_async_iteration_ends_when_closed() -> None:
    hub = Hub("ws")
    sub = hub.subscribe({}, ["t"])
    hub.publish("t", Message("t", {}, 1))
    hub.publish("t", Message("t", {}, 2))
    received = []
    async for message in sub:
        received.append(message.payload)
        if len(received) == 2:
            sub.close()
    assert received == [1, 2]


def test_subscriber_gauge_and_queue_depth() -> None:
    metrics = Metrics()
    hub = Hub("ws", metrics)
    a = hub.subscribe({}, ["t"])
    hub.subscribe({}, ["t"])
    hub.publish("t", Message("t", {}, 1))
    assert (
        metrics.registry.get_sample_value("mycel_subscribers", {"connector": "ws"}) == 2
    )
    assert hub.queue_depth() == 2
    a.close()
    assert (
        metrics.registry.get_sample_value("mycel_subscribers", {"connector": "ws"}) == 1
    )


def test_one_message_object_is_shared_by_all_subscribers() -> None:
    hub = Hub("ws")
    subs = [hub.subscribe({}, ["t"]) for _ in range(3)]
    message = Message("t", {}, {"n": 1})
    hub.publish("t", message)
    assert all(s.get_nowait() is message for s in subs)


def test_close_all_closes_every_subscriber_with_reason() -> None:
    reasons: list[str] = []
    hub = Hub("ws")
    for _ in range(3):
        hub.subscribe({}, ["t"], on_close=lambda s, why: reasons.append(why))
    hub.close_all("server shutting down")
    assert reasons == ["server shutting down"] * 3
    assert hub.subscribers == []


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="queue_size must be at least 1, not 0"):
        Hub("ws").subscribe({}, queue_size=0)


@pytest.mark.parametrize("indexed", [True, False])
def test_filter_on_a_literal_selects_subscribers_by_their_context(
    indexed: bool,
) -> None:
    hub = Hub("ws")
    vip = hub.subscribe({"params": {"kind": "vip"}}, ["t"])
    other = hub.subscribe({"params": {"kind": "basic"}}, ["t"])
    source = "context.params.kind == 'vip'"
    flt = make_filter(source) if indexed else Filter(Expression(source), None)
    assert (flt.indexed is not None) is indexed
    assert hub.publish("t", Message("t", {}, "offer"), flt) == 1
    assert drain(vip) == ["offer"]
    assert drain(other) == []
