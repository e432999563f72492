"""Which acknowledgement frames the connector sends, and when.

The broker shows whether a message was acknowledged, not in how many
frames; so these tests give ``Acker`` a channel that records the frames
instead of a real one. The broker tests cover that the acks land.

"""

from __future__ import annotations

import asyncio

from mycel_rabbit._acks import Acker


class RecordingChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[str, int, bool]] = []

    async def basic_ack(
        self, tag: int, multiple: bool = False, wait: bool = True
    ) -> None:
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(
        self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        self.frames.append(("nack", tag, multiple))


async def settle(acker: Acker) -> None:
    await asyncio.sleep(0)  # the flush runs at the end of this loop pass
    await asyncio.gather(*acker.sending)


def make() -> tuple[Acker, RecordingChannel]:
    channel = RecordingChannel()
    acker = Acker(channel)  # type: ignore[arg-type]
    return acker, channel


async def test_successes_in_one_pass_share_one_frame() -> None:
    acker, channel = make()
    for tag in (1, 2, 3, 4):
        acker.received(tag)
    for tag in (3, 1, 2, 4):
        acker.ack(tag)
    assert channel.frames == []  # nothing before the pass ends
    await settle(acker)
    assert channel.frames == [("ack", 4, True)]
    assert acker.unsettled == set()


async def test_success_above_a_message_in_progress_is_acked_alone() -> None:
    acker, channel = make()
    for tag in (1, 2, 3, 4):
        acker.received(tag)
    acker.ack(1)
    acker.ack(3)
    acker.ack(4)
    await settle(acker)
    # 2 is still running: a multiple ack of 4 would acknowledge it too.
    assert sorted(channel.frames) == [
        ("ack", 1, True),
        ("ack", 3, False),
        ("ack", 4, False),
    ]
    acker.ack(2)
    await settle(acker)
    assert channel.frames[-1] == ("ack", 2, True)
    assert acker.unsettled == set()


async def test_nack_goes_at_once_and_does_not_block_later_acks() -> None:
    acker, channel = make()
    for tag in (1, 2, 3):
        acker.received(tag)
    await acker.nack(1)
    assert channel.frames == [("nack", 1, False)]
    acker.ack(2)
    acker.ack(3)
    await settle(acker)
    assert channel.frames == [("nack", 1, False), ("ack", 3, True)]


async def test_no_frame_without_success() -> None:
    acker, channel = make()
    acker.received(1)
    acker.flush()
    await settle(acker)
    assert channel.frames == []
