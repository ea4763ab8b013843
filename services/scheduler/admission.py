"""Admission control: how many requests run downstream at once, and who waits for a slot.

At most `capacity()` requests run at once (TANDEM_MAX_INFLIGHT_PER_DECODE per healthy decode
worker); the rest wait in a bounded queue, bounded both by requests and by tokens (prompt +
max_tokens: the work a request brings). A request that would overflow either bound is refused
at once with RESOURCE_EXHAUSTED, so that overload costs the client one round trip and never
slows the requests already admitted. Waiters are served highest priority first, FIFO within a
priority. A waiter that is cancelled (client cancel, disconnect, deadline) leaves the queue; a
slot granted to it at the same moment goes to the next waiter.

Knows nothing of gRPC or workers: the capacity is a callable.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted


@dataclass(order=True)
class _Waiter:
    neg_priority: int
    seq: int
    num_tokens: int = field(compare=False)
    granted: asyncio.Future = field(compare=False)
    gone: bool = field(default=False, compare=False)  # cancelled while queued (lazy heap removal)


class AdmissionQueue:
    def __init__(
        self,
        capacity: Callable[[], int],
        *,
        max_queued_requests: int,
        max_queued_tokens: int,
        on_wait: Callable[[float], None] | None = None,  # seconds each admitted request waited
    ):
        self._capacity = capacity
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self._on_wait = on_wait or (lambda seconds: None)
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self.num_running = 0
        self.num_queued = 0
        self.num_queued_tokens = 0
        self.num_rejected = 0

    @asynccontextmanager
    async def slot(self, priority: int, num_tokens: int) -> AsyncIterator[None]:
        """Hold one running slot for the body; raises ResourceExhausted when the queue is full."""
        await self.acquire(priority, num_tokens)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: int, num_tokens: int) -> None:
        start = time.perf_counter()
        if not self.num_queued and self.num_running < self._capacity():
            self.num_running += 1
            self._on_wait(0.0)
            return
        if self.num_queued + 1 > self.max_queued_requests:
            self.num_rejected += 1
            raise ResourceExhausted(
                f"overloaded: {self.num_running} requests running and {self.num_queued} waiting, "
                f"the most that may wait (TANDEM_MAX_QUEUED_REQUESTS={self.max_queued_requests})"
            )
        if self.num_queued_tokens + num_tokens > self.max_queued_tokens:
            self.num_rejected += 1
            raise ResourceExhausted(
                f"overloaded: {self.num_queued_tokens} tokens waiting, this request brings {num_tokens} "
                f"(prompt + max_tokens), over TANDEM_MAX_QUEUED_TOKENS={self.max_queued_tokens}"
            )
        waiter = _Waiter(-priority, next(self._seq), num_tokens, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        self.num_queued += 1
        self.num_queued_tokens += num_tokens
        self.poke()  # the capacity may have grown since the last grant
        try:
            await waiter.granted
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release()  # granted as it was cancelled: pass the slot on
            else:
                self._drop(waiter)
            raise
        self._on_wait(time.perf_counter() - start)

    def release(self) -> None:
        self.num_running -= 1
        self.poke()

    def poke(self) -> None:
        """Grant slots to waiters while capacity allows (also after the capacity grew)."""
        capacity = self._capacity()
        while self._heap and self.num_running < capacity:
            waiter = heapq.heappop(self._heap)
            if waiter.gone:
                continue
            self._count_out(waiter)
            if waiter.granted.done():  # cancelled, its task not yet told
                continue
            self.num_running += 1
            waiter.granted.set_result(None)

    def _drop(self, waiter: _Waiter) -> None:
        if not waiter.gone:
            self._count_out(waiter)

    def _count_out(self, waiter: _Waiter) -> None:
        waiter.gone = True
        self.num_queued -= 1
        self.num_queued_tokens -= waiter.num_tokens
