"""The choices of one HTTP request, each streamed from the pipeline by a task of its own.

`Run` starts one task per prepared Job; each iterates `Frontend.generate` (the same call the
gRPC servicer makes) from start to end, inside the request's trace context, and puts its
pieces on one queue that the response reads. A generator is never resumed from two tasks,
so its spans and its clean-up run where they began. `cancel()` cancels them all: a pipeline
cancelled at any point leaves the admission queue, cancels its decode call and so frees the
request's KV blocks, exactly as a cancelled gRPC call does.

`until_disconnect` runs an awaitable unless the HTTP client goes away first (a request that
waits for its first token, or a non-streaming one, would otherwise run on for nobody).
"""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry import context as otel_context
from starlette.requests import Request

from services.common.errors import DeadlineExceeded

from ..frontend import Frontend, Job, Piece


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the answer was ready."""


class Run:
    def __init__(
        self,
        frontend: Frontend,
        jobs: list[Job],
        timeout_s: float | None,
        trace_context: otel_context.Context,
        keep: set[asyncio.Task],
    ):
        self._queue: asyncio.Queue[tuple[int, Piece | BaseException | None]] = asyncio.Queue()
        self._left = len(jobs)
        token = otel_context.attach(trace_context)  # the tasks copy the current context
        try:
            self._tasks = [
                asyncio.create_task(self._pump(frontend, i, job, timeout_s)) for i, job in enumerate(jobs)
            ]
        finally:
            otel_context.detach(token)
        for task in self._tasks:  # a strong reference until done, even when the response is gone
            keep.add(task)
            task.add_done_callback(keep.discard)

    async def _pump(self, frontend: Frontend, index: int, job: Job, timeout_s: float | None) -> None:
        # The deadline bounds the whole request, waiting for admission included: when it
        # passes, the pipeline is cancelled, as grpc cancels a handler whose deadline passed.
        expired = False
        timer = None
        if timeout_s is not None:
            task = asyncio.current_task()

            def expire() -> None:
                nonlocal expired
                expired = True
                task.cancel()

            timer = asyncio.get_running_loop().call_later(timeout_s, expire)
        try:
            async for piece in frontend.generate(job, timeout_s):
                self._queue.put_nowait((index, piece))
        except asyncio.CancelledError:
            if not expired:
                raise
            self._queue.put_nowait((index, DeadlineExceeded(f"the deadline of {timeout_s:g} s passed")))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which answers with it
            self._queue.put_nowait((index, e))
        else:
            self._queue.put_nowait((index, None))
        finally:
            if timer is not None:
                timer.cancel()

    async def next(self) -> tuple[int, Piece] | None:
        """The next (choice index, piece) of any choice; None when all have ended. Raises a choice's error."""
        while self._left:
            index, item = await self._queue.get()
            if item is None:
                self._left -= 1
                continue
            if isinstance(item, BaseException):
                self._left = 0
                raise item
            return index, item
        return None

    async def collect(self) -> list[list[Piece]]:
        """Every piece, per choice (non-streaming answers)."""
        pieces: list[list[Piece]] = [[] for _ in self._tasks]
        while (item := await self.next()) is not None:
            pieces[item[0]].append(item[1])
        return pieces

    def cancel(self) -> None:
        """Cancel the choices still running (synchronous: safe in a cancelled task's clean-up)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()


async def until_disconnect(request: Request, awaitable: Any) -> Any:
    """`await awaitable`, unless the client disconnects first: then it is cancelled and
    ClientDisconnected raised."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
