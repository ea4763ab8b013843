"""What prefill and decode workers share: the engine, load/info reporting, registration.

`WorkerApp` builds the engine (TANDEM_ENGINE: the torch `AsyncEngine`, or TensorRT-LLM's),
the gRPC server with the `Worker` service (GetLoad, GetInfo), and registers with the
scheduler when TANDEM_SCHEDULER_ADDR is set. The prefill and decode apps add their own
servicers. The engine is used only through the engine interface (shared/engine/interface.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc

from services.common.errors import ErrorInterceptor
from services.common.registration import Registrar
from services.common.server import GrpcServer
from services.common.telemetry import quiet_telemetry, traced_server_interceptors
from services.common.tls import Tls
from shared.config import ConfigError, WorkerConfig
from shared.engine import (
    AsyncEngine,
    EngineClient,
    EngineConfig,
    InvalidRequest,
    KVCacheTooSmall,
    LLMEngine,
    ModelLoadError,
)
from shared.engine.async_engine import EngineDeadError
from shared.kv.errors import KvTransferError, KvTransferTimeout
from shared.pb.tandem.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from shared.telemetry import Telemetry

log = logging.getLogger(__name__)

TRANSPORT_TO_PB = {"grpc": kv_pb2.KV_TRANSPORT_GRPC, "collective": kv_pb2.KV_TRANSPORT_COLLECTIVE}

# Most specific first: the interceptor takes the first match.
WORKER_ERRORS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    KvTransferTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    KvTransferError: grpc.StatusCode.DATA_LOSS,
    EngineDeadError: grpc.StatusCode.UNAVAILABLE,
}


def build_engine(config: WorkerConfig, draft_client_factory=None) -> EngineClient:
    """Load the model and start the engine (the torch engine's thread, or TensorRT-LLM)."""
    if config.engine == "trtllm":  # the TensorRT-LLM image only: never imported otherwise
        from shared.engines.trtllm import build_trtllm_engine

        return build_trtllm_engine(config, draft_client_factory)
    import torch

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        engine = LLMEngine(EngineConfig(**config.engine_kwargs()))
    except (ModelLoadError, FileNotFoundError) as e:
        raise ConfigError(f"TANDEM_MODEL: {e}") from None
    except KVCacheTooSmall as e:
        raise ConfigError(str(e)) from None
    return AsyncEngine(engine).start()


class ActiveRequests:
    """Counts requests a servicer is handling (KV transfers included), for GetLoad."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> ActiveRequests:
        self.count += 1
        return self

    def __exit__(self, *exc) -> None:
        self.count -= 1


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, aengine: EngineClient, config: WorkerConfig, model_name: str, active: ActiveRequests):
        self._aengine = aengine
        self._config = config
        self._model_name = model_name
        self._active = active

    async def GetLoad(self, request, context) -> worker_pb2.WorkerLoad:
        s = self._aengine.stats()
        return worker_pb2.WorkerLoad(
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            num_cached_blocks=s.num_cached_blocks,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
            prefix_cache_query_tokens=s.prefix_cache_query_tokens,
            num_preemptions=s.num_preemptions,
            num_active_requests=self._active.count,
        )

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        info = self._aengine.info()
        return worker_pb2.WorkerInfo(
            role=self._config.role,
            model_name=self._model_name,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            block_size=info.block_size,
            num_layers=info.num_layers,
            num_kv_heads=info.num_kv_heads,
            head_dim=info.head_dim,
            dtype=self._config.dtype,
            device=self._config.device,
            engine=self._config.engine,
            kv_transport=TRANSPORT_TO_PB[self._config.kv_transport],
            eos_token_ids=list(info.eos_token_ids),
        )


class WorkerApp:
    """A worker process's pieces; subclasses add their servicers in `_add_servicers`."""

    role = ""

    def __init__(
        self, config: WorkerConfig, *, telemetry: Telemetry | None = None, aengine: EngineClient | None = None
    ):
        self.config = config
        self.telemetry = telemetry if telemetry is not None else quiet_telemetry(f"tandem-{self.role}")
        self.tls = Tls.from_config(config)  # before the engine: its drafter's channel uses it
        self.tls.log_mode(self.role)
        self.aengine = aengine if aengine is not None else build_engine(config, self._draft_client_factory())
        self.model_name = config.model_name or self.aengine.info().model_name
        self.active = ActiveRequests()
        self.server = GrpcServer(
            host=config.host,
            port=config.port,
            advertise_address=config.advertise_address,
            tls=self.tls,
            service_names=[
                *self._service_names(),
                worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
            ],
            # tracing outermost, so that its span records the status code the errors map to
            interceptors=[*traced_server_interceptors(self.telemetry), ErrorInterceptor(WORKER_ERRORS)],
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(
            WorkerServicer(self.aengine, config, self.model_name, self.active), self.server.grpc_server
        )
        self._add_servicers(self.server.grpc_server)
        self.registrar: Registrar | None = None
        self._registration: asyncio.Task | None = None
        self._sampler: asyncio.Task | None = None

    def _draft_client_factory(self):
        """Subclass hook: a picklable factory of the draft client an engine's drafter uses (or None)."""
        return None

    def _service_names(self) -> Sequence[str]:
        raise NotImplementedError

    def _add_servicers(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> int:
        port = await self.server.start()
        if self.config.scheduler_addr:
            self.registrar = Registrar(
                self.config.scheduler_addr,
                worker_pb2.RegisterWorkerRequest(
                    address=self.address, role=self.role, model_name=self.model_name
                ),
                interval_s=self.config.register_interval_s,
                tls=self.tls,
            )
            self._registration = asyncio.create_task(self.registrar.run(), name="register")
        self._sampler = asyncio.create_task(self._sample_engine_stats(), name="engine-stats")
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, let running calls finish (grace), then stop the engine."""
        for task in (self._registration, self._sampler):
            if task is not None:
                task.cancel()
        await self.server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        await self._close()
        await asyncio.to_thread(self.aengine.shutdown)
        await asyncio.to_thread(self.telemetry.shutdown)  # flushes buffered spans

    async def _sample_engine_stats(self, interval_s: float = 0.5) -> None:
        """Engine gauges and counters for /metrics (the engine itself knows nothing of them)."""
        metrics = self.telemetry.metrics
        last = self.aengine.stats()
        while True:
            s = self.aengine.stats()
            metrics.queue_depth.set(s.num_waiting)
            metrics.running_sequences.set(s.num_running)
            metrics.set_kv_blocks(s.num_total_blocks - s.num_free_blocks, s.num_total_blocks)
            metrics.record_prefix_cache(
                s.prefix_cache_query_tokens - last.prefix_cache_query_tokens,
                s.prefix_cache_hit_tokens - last.prefix_cache_hit_tokens,
            )
            metrics.preemptions.inc(s.num_preemptions - last.num_preemptions)
            metrics.record_spec_steps(last.spec_steps_by_k, s.spec_steps_by_k)
            last = s
            await asyncio.sleep(interval_s)

    async def _close(self) -> None:
        """Subclass hook: close peer channels and the like."""
