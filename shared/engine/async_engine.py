"""An asyncio front for LLMEngine: the engine runs its step loop in its own thread.

Coroutines hand work to the engine thread through a thread-safe command queue; it runs
commands between steps, so the engine itself never needs a lock. Outputs come back to each
request's asyncio queue through `call_soon_threadsafe`. Knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from shared.params import RequestOutput, SamplingParams

from .engine import EngineStats, LLMEngine

log = structlog.get_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stopped = threading.Event()
        self._stats = engine.stats()

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._commands.put(None)
        self._thread.join(timeout)

    def stats(self) -> EngineStats:
        """Snapshot taken by the engine thread after its last step (no locking needed)."""
        return self._stats

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(engine, *args) on the engine thread between steps and return its result."""
        if self._stopped.is_set():
            raise EngineDeadError("engine is stopped")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine, *args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                _post(loop, _set_exception, fut, e)
            else:
                _post(loop, _set_result, fut, result)

        self._commands.put(run)
        return await fut

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._stopped.is_set():
            await self.call(lambda eng: eng.abort(request_id))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       hold_kv: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iteration early (cancel, break) aborts it,
        unless it finished with hold_kv, whose blocks the caller releases."""
        q = self.open_stream(request_id)
        added: list[bool] = []  # set on the engine thread once the request is in

        def add(eng: LLMEngine) -> None:
            eng.add_request(request_id, prompt_token_ids, params, hold_kv=hold_kv)
            added.append(True)

        try:
            await self.call(add)
        except BaseException:
            self._unregister(request_id, q)
            # Cancelled while the command waited for the engine thread: it may still run. The
            # abort queued behind it (commands run in order) removes the request if it did; a
            # held request would otherwise keep its blocks with no one left to release them.
            with contextlib.suppress(EngineDeadError):
                await asyncio.shield(self.call(lambda eng: added and eng.abort(request_id)))
            raise
        async for out in self.stream(request_id, q):
            yield out

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """Register a queue for a request's outputs before it is added to the engine."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    async def stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            error: BaseException | None = None  # arrived behind outputs still to yield
            while True:
                item = error or await q.get()
                if isinstance(item, BaseException):
                    raise item
                # Fold the outputs queued up behind this one into it: a consumer that fell
                # behind (slow client, busy event loop) then sends one message with several
                # tokens instead of a backlog of one-token messages.
                while not item.finished and not q.empty():
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        error = nxt
                        break
                    item = _merge(item, nxt)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            # no await once finished: a caller cancelled right after the last output must still
            # see it (the prefill worker then owns a held request it has to release)
            if self._unregister(request_id, q) and not finished:
                await asyncio.shield(self.abort(request_id))

    async def close_stream(self, request_id: str, q: asyncio.Queue) -> None:
        """Unregister the stream `q` and abort its request, unless a newer stream took the id
        over. Engine commands run in order, so an abort sent here lands before anything a newer
        request under this id asks for."""
        if self._unregister(request_id, q):
            await self.abort(request_id)

    def _unregister(self, request_id: str, q: asyncio.Queue) -> bool:
        """Drop the stream `q` if it is still the one registered under request_id. A client may
        reuse a request id: one request's late clean-up must neither unregister nor abort the
        next one's."""
        if self._streams.get(request_id, (None, None))[1] is not q:
            return False
        del self._streams[request_id]
        return True

    # -- engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()
                if not self._drain(block):
                    return
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    self._stats = self.engine.stats()
                    for out in outputs:
                        self._deliver(out.request_id, out)
                else:
                    self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - a dead engine must fail every stream loudly
            log.exception("engine_loop_failed")
            self._stopped.set()
            err = EngineDeadError(f"engine failed: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, err)
            self._fail_pending(err)
        finally:
            self._stopped.set()

    def _drain(self, block: bool) -> bool:
        """Run queued commands; wait for one if the engine is idle. False on shutdown."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            if cmd is None:
                return False
            cmd()
            block = False

    def _fail_pending(self, err: Exception) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is not None:
                try:
                    cmd()
                except Exception:  # noqa: BLE001
                    pass

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, q = entry
            _post(loop, q.put_nowait, item)


def _merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One output with the new tokens of both; counters and finish state from the later one."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (first.logprobs or []) + (then.logprobs or [])
    return dataclasses.replace(
        then,
        new_token_ids=first.new_token_ids + then.new_token_ids,
        logprobs=logprobs,
        queue_seconds=first.queue_seconds if first.queue_seconds is not None else then.queue_seconds,
    )


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is waiting any more
        pass


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
