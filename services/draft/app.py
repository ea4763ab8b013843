"""Build the draft service from its config (used by __main__ and by tests).

The draft engine runs on the event loop's own thread: calls from several decode workers run
one at a time in arrival order, each for the few milliseconds of its forward passes, while
gRPC's own threads keep receiving. A worker thread for the engine would add two thread
hand-offs per call (to it and back to the loop), and on a busy host each hand-off waits for a
core. Together with the decode worker's prefetch (services/decode/draft_client.py), this gave
a 9-11% lower c1 TPOT through the draft service in each repeat of one interleaved `bench
serve` run, against neither change. Each change alone gave mixed results.

A background task frees sequences that no call mentioned for TANDEM_DRAFT_IDLE_TIMEOUT_S
(their decode worker died, or restarted under a new client id).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.common.draft_stream import DraftStreamServer
from services.common.errors import ErrorInterceptor
from services.common.server import GrpcServer
from services.common.telemetry import quiet_telemetry, traced_server_interceptors
from services.common.tls import Tls
from shared.config import ConfigError, DraftConfig
from shared.engine import EngineConfig, InvalidRequest, KVCacheTooSmall, ModelLoadError
from shared.engine.draft import DraftEngine
from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc, worker_pb2, worker_pb2_grpc
from shared.telemetry import Telemetry

from .servicer import DraftServicer, DraftWorkerServicer

log = logging.getLogger(__name__)

# the engine's errors as status codes, on either transport
ERRORS = {InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT}


def build_engine(config: DraftConfig) -> DraftEngine:
    import torch

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        return DraftEngine(EngineConfig(**config.engine_kwargs()), ahead_rows=config.ahead_rows)
    except (ModelLoadError, FileNotFoundError) as e:
        raise ConfigError(f"TANDEM_MODEL: {e}") from None
    except KVCacheTooSmall as e:
        raise ConfigError(str(e)) from None


class DraftApp:
    role = "draft"

    def __init__(
        self, config: DraftConfig, *, telemetry: Telemetry | None = None, engine: DraftEngine | None = None
    ):
        self.config = config
        self.telemetry = telemetry if telemetry is not None else quiet_telemetry("tandem-draft")
        self.engine = engine if engine is not None else build_engine(config)
        self.model_name = config.model_name or self.engine.model_name
        self.tls = Tls.from_config(config)
        self.tls.log_mode(self.role)
        self.server = GrpcServer(
            host=config.host,
            port=config.port,
            advertise_address=config.advertise_address,
            tls=self.tls,
            service_names=[
                draft_pb2.DESCRIPTOR.services_by_name["Draft"].full_name,
                worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
            ],
            # tracing outermost, so that its span records the status code the errors map to
            interceptors=[
                *traced_server_interceptors(self.telemetry),
                ErrorInterceptor(ERRORS),
            ],
        )
        self.servicer = DraftServicer(self.engine, self._update_gauges)
        draft_pb2_grpc.add_DraftServicer_to_server(self.servicer, self.server.grpc_server)
        self.worker_servicer = DraftWorkerServicer(self.engine, config, self.model_name)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.worker_servicer, self.server.grpc_server)
        # the same servicer on a plain TCP stream, for decode workers' per-step calls: only while
        # gRPC is plaintext too (the stream has no TLS)
        self.stream: DraftStreamServer | None = None
        if config.stream and not self.tls.enabled:
            self.stream = DraftStreamServer(self.servicer, self.telemetry.tracer, ERRORS)
        elif config.stream:
            log.info("draft: TLS is on, so the stream transport is off: decode workers call over gRPC")
        self._sweeper: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        port = await self.server.start()
        if self.stream is not None:
            self.worker_servicer.stream_port = await self.stream.start(self.config.host, self.config.stream_port)
            log.info("draft stream transport on %s:%d", self.config.host, self.worker_servicer.stream_port)
        self._update_gauges()
        self._sweeper = asyncio.create_task(self._free_idle(), name="draft-idle")
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.stream is not None:
            await self.stream.stop()
        await self.server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        await asyncio.to_thread(self.telemetry.shutdown)

    def _update_gauges(self) -> None:
        s = self.engine.stats()
        self.telemetry.metrics.running_sequences.set(s.num_sequences)
        self.telemetry.metrics.set_kv_blocks(s.num_total_blocks - s.num_free_blocks, s.num_total_blocks)

    async def _free_idle(self) -> None:
        timeout = self.config.idle_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            n = self.engine.free_idle(timeout)
            if n:
                log.info("freed %d draft sequences idle for %.0f s", n, timeout)
                self._update_gauges()
