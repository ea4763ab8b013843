"""An asyncio front for LLMEngine: the engine runs its step loop in its own thread.

Coroutines hand work to the engine thread through a thread-safe command queue; it runs
commands between steps, so the engine itself never needs a lock. Outputs come back to each
request's asyncio queue through `call_soon_threadsafe`. Knows nothing of gRPC.

`AsyncEngine` is the torch implementation of the engine interface (shared/engine/interface.py):
the services use only those verbs; `call` is for tests and tools that drive the engine itself.
If the engine thread dies, every stream and every queued command fails with EngineDeadError;
a queued command never runs against a dead engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import structlog

from shared.params import RequestOutput, SamplingParams

from .engine import EngineStats, LLMEngine
from .interface import (
    KV_HANDOFF_TENSORS,
    EngineInfo,
    FirstToken,
    KvPieceIn,
    Prefilled,
    PrefillOutput,
    Reservation,
)
from .spec import Proposer

log = structlog.get_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


class _Command:
    """fn(engine) to run on the engine thread; its outcome goes to `fut` on `loop`."""

    __slots__ = ("fn", "loop", "fut")

    def __init__(self, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop, fut: asyncio.Future):
        self.fn, self.loop, self.fut = fn, loop, fut

    def run(self, engine: LLMEngine) -> None:
        try:
            result = self.fn(engine)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            _post(self.loop, _set_exception, self.fut, e)
        else:
            _post(self.loop, _set_result, self.fut, result)

    def fail(self, err: BaseException) -> None:
        _post(self.loop, _set_exception, self.fut, err)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stopped = threading.Event()
        self._dead_error: EngineDeadError | None = None  # why the engine thread stopped, if it failed
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
            raise self._dead_error or EngineDeadError("engine is stopped")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._commands.put(_Command(lambda eng: fn(eng, *args), loop, fut))
        if self._stopped.is_set():  # the engine thread died meanwhile: fail what it left behind
            self._fail_pending(self._dead_error or EngineDeadError("engine is stopped"))
        return await fut

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._stopped.is_set():
            await self.call(lambda eng: eng.abort(request_id))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       hold_kv: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iteration early (cancel, break) aborts it,
        unless it finished with hold_kv, whose blocks the caller releases."""
        # structured output: its grammar compiles here, off the engine thread the batch runs on
        matcher = await asyncio.to_thread(self.engine.matcher_for, prompt_token_ids, params) if params.guidance else None
        q = self.open_stream(request_id)
        added: list[bool] = []  # set on the engine thread once the request is in

        def add(eng: LLMEngine) -> None:
            eng.add_request(request_id, prompt_token_ids, params, hold_kv=hold_kv, matcher=matcher)
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

    # -- the engine interface (shared/engine/interface.py) ------------------------------
    def info(self) -> EngineInfo:
        e, mc = self.engine, self.engine.model_config
        return EngineInfo(
            model_name=mc.name,
            vocab_size=mc.vocab_size,
            max_model_len=e.max_model_len,
            block_size=e.block_size,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            kv_dtype=e.kv_cache_dtype,
            eos_token_ids=tuple(mc.eos_token_ids),
            kv_handoff=KV_HANDOFF_TENSORS,
            kv_width=e.kv_head_width,
        )

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        # reads only what is fixed at start-up (vocabulary, model length, cache size): no engine thread needed
        self.engine.validate_request(prompt_token_ids, params)

    def set_proposer(self, proposer: Proposer | None) -> None:
        """Speculate with `proposer` from the next step on (queued like any command)."""
        self._commands.put(_Command(lambda eng: eng.set_proposer(proposer), _NoLoop(), _NoFuture()))

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> PrefillOutput:
        """Prefill the prompt, sample the first token, export the prompt's KV (a copy) and
        release the blocks at once (full ones stay in the prefix cache)."""
        params = dataclasses.replace(params, max_tokens=1, ignore_eos=True, stop_token_ids=[])
        first = None
        held = False
        try:
            async for out in self.generate(request_id, prompt_token_ids, params, hold_kv=True):
                if out.new_token_ids:
                    first = out
            if first is None or not first.finished:
                raise RuntimeError(f"prefill of {request_id} ended without a first token")
            held = True
            kv = await self.call(lambda eng: eng.export_kv(request_id))  # [L, 2, T, Hkv, D], a copy
            await self.call(lambda eng: eng.release(request_id))
            held = False
            return PrefillOutput(first, kv=kv)
        finally:
            if held:  # cancelled between the first token and the release
                await asyncio.shield(self.abort(request_id))

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Reservation | None:
        self.validate(prompt_token_ids, params)
        reserved: list[bool] = []  # set on the engine thread

        def reserve(eng: LLMEngine) -> bool:
            reserved.append(eng.reserve(request_id, len(prompt_token_ids)))
            return reserved[-1]

        try:
            if not await self.call(reserve):
                return None
        except BaseException:
            # Cancelled while the command waited for the engine thread: it may still run. The
            # abort queued behind it (commands run in order) frees the blocks if it did.
            with contextlib.suppress(EngineDeadError):
                await asyncio.shield(self.call(lambda eng: reserved and reserved[0] and eng.abort(request_id)))
            raise
        # registered before add_prefilled, so that no output can be missed
        return Reservation(request_id, list(prompt_token_ids), params, handle=self.open_stream(request_id))

    async def import_kv(self, reservation: Reservation, pieces: Sequence[KvPieceIn]) -> None:
        """Scatter KV pieces into the reserved blocks (one engine command for all of them)."""
        rid = reservation.request_id

        def scatter(eng: LLMEngine) -> None:
            for piece in pieces:
                eng.import_kv(rid, piece.tensor, piece.layer_start, piece.token_start)

        await self.call(scatter)

    async def add_prefilled(self, reservation: Reservation, first: FirstToken, handoff: bytes = b"") -> Prefilled:
        rid, prompt, params = reservation.request_id, reservation.prompt_token_ids, reservation.params
        matcher = (
            await asyncio.to_thread(self.engine.matcher_for, prompt, params, [first.token_id]) if params.guidance else None
        )
        done = await self.call(
            lambda eng: eng.add_prefilled(rid, prompt, first.token_id, params, first.logprob, matcher=matcher)
        )
        if done is not None:  # the first token ended it; the engine freed the reservation
            return Prefilled(done.finish_reason, _no_outputs())
        return Prefilled(None, self._prefilled_outputs(reservation, first.num_cached_tokens))

    async def _prefilled_outputs(self, reservation: Reservation, num_cached_tokens: int) -> AsyncIterator[RequestOutput]:
        async for out in self.stream(reservation.request_id, reservation.handle):
            # the engine counts no cached tokens for an imported prompt; the prefill worker's count holds
            out.num_cached_tokens = num_cached_tokens
            yield out

    async def release(self, reservation: Reservation) -> None:
        await self.close_stream(reservation.request_id, reservation.handle)

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
            err = self._dead_error = EngineDeadError(f"engine failed: {e!r}")
            self._stopped.set()
            for rid in list(self._streams):
                self._deliver(rid, err)
            self._fail_pending(err)
        finally:
            self._stopped.set()
            # shut down with commands still queued behind the stop: they never run either
            self._fail_pending(self._dead_error or EngineDeadError("engine is stopped"))

    def _drain(self, block: bool) -> bool:
        """Run queued commands; wait for one if the engine is idle. False on shutdown."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            if cmd is None:
                return False
            cmd.run(self.engine)
            block = False

    def _fail_pending(self, err: EngineDeadError) -> None:
        """Fail every queued command with `err` without running it: the engine is dead."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is not None:
                cmd.fail(err)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, q = entry
            _post(loop, q.put_nowait, item)


async def _no_outputs() -> AsyncIterator[RequestOutput]:
    return
    yield  # an async generator that yields nothing


class _NoLoop:
    """Where a fire-and-forget command's outcome goes: nowhere (failures are logged)."""

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        if fn is _set_exception:
            log.warning("engine_command_failed", error=repr(args[1]))


class _NoFuture:
    pass


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
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs,
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
