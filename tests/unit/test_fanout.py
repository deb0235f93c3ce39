"""Drop-oldest fan-out and in-order watermarks as plain logic."""

from __future__ import annotations

import asyncio

import pytest

from edge_nodes.vitals.domain import check_ahead
from edge_nodes.vitals.fanout import Fanout, Subscriber, SubscriberClosed
from telehealth.errors import InvalidArgument
from telehealth.watermark import Watermark


async def test_full_subscriber_drops_oldest_and_reports_the_gap() -> None:
    drops: list[int] = []
    sub: Subscriber[int] = Subscriber(3, on_drop=drops.append)
    for i in range(10):
        sub.offer(i)
    dropped, events = await sub.take()
    assert (dropped, events) == (7, [7, 8, 9])
    assert sum(drops) == 7
    sub.offer(10)
    assert await sub.take() == (0, [10])


async def test_slow_subscriber_does_not_affect_another() -> None:
    fan: Fanout[int] = Fanout()
    slow: Subscriber[int] = Subscriber(2)
    fast: Subscriber[int] = Subscriber(1000)
    fan.add(slow)
    fan.add(fast)
    for i in range(100):
        fan.publish(i)
    assert (await fast.take())[1] == list(range(100))
    assert await slow.take() == (98, [98, 99])


async def test_take_waits_then_closes_with_reason() -> None:
    sub: Subscriber[int] = Subscriber(4)
    waiter = asyncio.create_task(sub.take())
    await asyncio.sleep(0)
    sub.offer(1)
    assert await waiter == (0, [1])
    sub.close("session moved")
    with pytest.raises(SubscriberClosed, match="session moved"):
        await sub.take()


def test_watermark_advances_in_order_only() -> None:
    w = Watermark()
    for seq in (1, 2, 4, 5):
        w.add(seq)
    assert w.value == 2 and w.pending == 2
    assert w.seen(4) and not w.seen(3)
    w.add(3)
    assert w.value == 5 and w.pending == 0
    w.add(2)
    assert w.value == 5


def test_watermark_refuses_a_seq_far_ahead() -> None:
    w = Watermark()
    check_ahead(w, 10_000)
    with pytest.raises(InvalidArgument, match="ahead of the received watermark"):
        check_ahead(w, 10_001)


def test_watermark_advance_to_skips_what_is_durable_elsewhere() -> None:
    w = Watermark()
    w.add(12)
    w.advance_to(10)
    assert w.value == 10 and w.seen(12)
    w.add(11)
    assert w.value == 12 and w.pending == 0
