"""The workers behind the scheduler: their channels, health and last reported load.

Workers come from configuration or register themselves; a background task checks each one's
gRPC health and polls its load every `interval_s`. A worker that fails a check, or a call,
is skipped by routing until a later check passes. Self-registered workers register again
every few seconds (so a restarted scheduler learns them back); one that is unhealthy and has
not registered for `expiry_s` is forgotten, as pods scaled down or replaced never come back
under the same address.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import CHANNEL_OPTIONS
from services.common.tls import PLAINTEXT, Tls
from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc

from .router import PrefixMemory

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
# gRPC backs off reconnecting to an unreachable address up to 120 s by default; a worker that
# comes back should be routable within about a health interval, not two minutes.
POOL_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class WorkerHandle:
    """One worker as the scheduler sees it."""

    address: str
    role: str  # "prefill" | "decode"
    registered: bool  # it registered itself (at least once)
    channel: grpc.aio.Channel  # health and load polls
    call_channel: grpc.aio.Channel  # requests: traced (client interceptors), unlike the polls
    prefix: PrefixMemory
    configured: bool = False  # named in the scheduler's configuration: never forgotten
    last_registered: float = 0.0  # time.monotonic() of its last registration
    healthy: bool = False
    info: worker_pb2.WorkerInfo | None = None
    load: worker_pb2.WorkerLoad = field(default_factory=worker_pb2.WorkerLoad)
    # Requests this scheduler has sent and not yet seen finish (decode), or whose first
    # token has not come back yet (prefill): exact for one scheduler, unlike the polled load.
    num_inflight: int = 0
    # Blocks promised to requests routed since the last load poll (subtracted from free blocks).
    num_pending_blocks: int = 0

    @property
    def block_size(self) -> int:
        return self.info.block_size if self.info is not None and self.info.block_size else 16

    @property
    def queue_length(self) -> int:
        return max(self.num_inflight, self.load.num_running + self.load.num_waiting)

    @property
    def free_blocks(self) -> int:
        return self.load.num_free_blocks - self.num_pending_blocks

    def decode_stub(self) -> worker_pb2_grpc.DecodeStub:
        return worker_pb2_grpc.DecodeStub(self.call_channel)

    async def close(self) -> None:
        await self.channel.close()
        await self.call_channel.close()


class WorkerPool:
    """Configured and registered workers, kept fresh by a health/load loop."""

    def __init__(
        self,
        *,
        interval_s: float,
        prefix_memory_blocks: int,
        interceptors=(),
        expiry_s: float = 60.0,
        tls: Tls = PLAINTEXT,
    ):
        self._interval_s = interval_s
        self._expiry_s = expiry_s
        self._tls = tls
        self._interceptors = list(interceptors)
        self._prefix_memory_blocks = prefix_memory_blocks
        self.workers: dict[str, WorkerHandle] = {}
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        # called after a worker turned healthy (e.g. the admission queue, whose capacity grew)
        self.on_healthy: list[Callable[[WorkerHandle], None]] = []

    def add(self, address: str, role: str, *, registered: bool = False) -> WorkerHandle:
        """Add a worker (idempotent); it is checked right away, and routable once healthy."""
        handle = self.workers.get(address)
        if handle is not None and handle.role == role:
            self._mark_source(handle, registered)
            if not handle.healthy:  # a worker back from a restart: check it now, not next interval
                self._changed.set()
            return handle
        if handle is not None:  # same address, new role: a restarted worker
            asyncio.ensure_future(handle.close())
        handle = WorkerHandle(
            address,
            role,
            registered,
            channel=self._tls.aio_channel(address, options=POOL_CHANNEL_OPTIONS),
            call_channel=self._tls.aio_channel(
                address, options=POOL_CHANNEL_OPTIONS, interceptors=self._interceptors
            ),
            prefix=PrefixMemory(self._prefix_memory_blocks),
        )
        self._mark_source(handle, registered)
        self.workers[address] = handle
        self._changed.set()
        return handle

    @staticmethod
    def _mark_source(handle: WorkerHandle, registered: bool) -> None:
        if registered:
            handle.registered = True
            handle.last_registered = time.monotonic()
        else:
            handle.configured = True

    def expire(self) -> list[str]:
        """Forget self-registered workers that are unhealthy and silent for `expiry_s`; their addresses."""
        now = time.monotonic()
        gone = [
            w
            for w in self.workers.values()
            if not w.configured and not w.healthy and now - w.last_registered > self._expiry_s
        ]
        for w in gone:
            log.info(
                "worker %s (%s) forgotten: unhealthy and not registered for %.0fs",
                w.address,
                w.role,
                now - w.last_registered,
            )
            del self.workers[w.address]
            asyncio.ensure_future(w.close())
        return [w.address for w in gone]

    def healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role == role and w.healthy]

    def max_model_len(self) -> int | None:
        """The shortest max_model_len among decode workers that told theirs (None: none did yet)."""
        lens = [w.info.max_model_len for w in self.workers.values() if w.role == "decode" and w.info]
        return min(lens) if lens else None

    def mark_failed(self, handle: WorkerHandle, reason: str) -> None:
        """A call to the worker failed in a way that suggests it is down: skip it until the next check."""
        if handle.healthy:
            log.warning("worker %s (%s) marked unhealthy: %s", handle.address, handle.role, reason)
        handle.healthy = False
        self._changed.set()

    async def check(self, handle: WorkerHandle) -> bool:
        """Health check, then (when serving) load and, once, info. Returns the new health."""
        try:
            resp = await health_pb2_grpc.HealthStub(handle.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT_S
            )
            serving = resp.status == health_pb2.HealthCheckResponse.SERVING
            if serving:
                stub = worker_pb2_grpc.WorkerStub(handle.channel)
                if handle.info is None:
                    handle.info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=CHECK_TIMEOUT_S)
                handle.load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=CHECK_TIMEOUT_S)
                handle.num_pending_blocks = 0
        except grpc.aio.AioRpcError as e:
            serving = False
            reason = f"{e.code().name}: {e.details()}"
        else:
            reason = "health status NOT_SERVING"
        changed = serving != handle.healthy
        if changed:
            if serving:
                log.info("worker %s (%s) is healthy", handle.address, handle.role)
            else:
                log.warning("worker %s (%s) is unhealthy: %s", handle.address, handle.role, reason)
        handle.healthy = serving
        if changed and serving:
            for callback in self.on_healthy:
                callback(handle)
        return serving

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in list(self.workers.values())))

    async def refresh(self, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        """Check every worker now (GetModelInfo: the polled load may be a health interval old, and
        would show a request that has finished as still running)."""
        try:
            await asyncio.wait_for(self.check_all(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def wait_ready(self, role: str = "decode", timeout_s: float = 30.0) -> None:
        """Until at least one worker of `role` is healthy (start-up helper for tools and tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.healthy(role):
            if loop.time() > deadline:
                raise TimeoutError(f"no healthy {role} worker after {timeout_s:.0f}s")
            await self.check_all()
            if not self.healthy(role):
                await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="worker-pool-health")

    async def _loop(self) -> None:
        while True:
            self._changed.clear()
            await self.check_all()
            self.expire()
            # a worker added or failed meanwhile is checked right away, not after a full interval
            try:
                await asyncio.wait_for(self._changed.wait(), self._interval_s)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*(w.close() for w in self.workers.values()), return_exceptions=True)
