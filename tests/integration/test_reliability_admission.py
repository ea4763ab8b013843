"""The admission queue alone (no servers): slots are never leaked nor double-granted, whatever
order grants, cancellations and capacity changes come in."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import ResourceExhausted
from services.scheduler.admission import AdmissionQueue


def queue(capacity: list[int], **bounds) -> AdmissionQueue:
    bounds = {"max_queued_requests": 8, "max_queued_tokens": 1000, **bounds}
    return AdmissionQueue(lambda: capacity[0], **bounds)


async def test_a_waiter_cancelled_as_it_is_granted_passes_its_slot_on():
    q = queue([1])
    await q.acquire(0, 10)
    first = asyncio.ensure_future(q.acquire(0, 10))
    second = asyncio.ensure_future(q.acquire(0, 10))
    await asyncio.sleep(0)
    assert q.num_queued == 2
    q.release()  # grants `first` ...
    first.cancel()  # ... which is cancelled before it ran
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the slot went on to `second`
    assert (q.num_running, q.num_queued, q.num_queued_tokens) == (1, 0, 0)
    q.release()
    assert q.num_running == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_its_tokens():
    q = queue([1], max_queued_tokens=25)
    await q.acquire(0, 10)
    waiter = asyncio.ensure_future(q.acquire(0, 20))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):  # 20 + 10 > 25
        await q.acquire(0, 10)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert (q.num_queued, q.num_queued_tokens) == (0, 0)
    q.release()
    assert q.num_running == 0
    await q.acquire(0, 20)  # the freed room is usable
    assert q.num_running == 1


async def test_more_capacity_admits_waiters_at_once():
    capacity = [1]
    q = queue(capacity)
    await q.acquire(0, 1)
    waiters = [asyncio.ensure_future(q.acquire(p, 1)) for p in (0, 1, 2)]
    await asyncio.sleep(0)
    capacity[0] = 3  # e.g. a second decode worker became healthy
    q.poke()
    await asyncio.sleep(0)
    done = [w.done() for w in waiters]
    assert done == [False, True, True]  # the two highest priorities
    assert (q.num_running, q.num_queued) == (3, 1)
    q.release()
    await asyncio.wait_for(waiters[0], 1)


async def test_zero_queue_refuses_as_soon_as_the_slots_are_taken():
    q = queue([2], max_queued_requests=0)
    await q.acquire(0, 1)
    await q.acquire(0, 1)
    with pytest.raises(ResourceExhausted, match="TANDEM_MAX_QUEUED_REQUESTS=0"):
        await q.acquire(5, 1)
    assert q.num_rejected == 1
