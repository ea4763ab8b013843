"""Build the decode worker from its config (used by __main__ and by tests)."""

from __future__ import annotations

import asyncio

from services.common.worker_app import WorkerApp
from shared.kv.collective_receiver import CollectiveKvReceiver
from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc

from .draft_client import DraftProposer, build_proposer
from .servicer import DecodeServicer
from .worker import DecodeWorker


class DecodeApp(WorkerApp):
    role = "decode"

    def _service_names(self):
        return [worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]

    def _add_servicers(self, server) -> None:
        config = self.config
        self.receiver = None
        if config.kv_transport == "collective":
            host = config.advertise_address.rpartition(":")[0] or "127.0.0.1"
            self.receiver = CollectiveKvReceiver(
                host, config.kv_receiver_port, device=config.device, timeout_s=config.kv_timeout_s
            )
        worker_cls = DecodeWorker
        if config.engine == "trtllm":  # TensorRT-LLM's cache transceiver moves the KV
            from services.common.trtllm_workers import TrtllmDecodeWorker as worker_cls
        self.worker = worker_cls(
            self.aengine,
            self.telemetry,
            transport=config.kv_transport,
            chunk_bytes=config.kv_chunk_bytes,
            kv_timeout_s=config.kv_timeout_s,
            receiver=self.receiver,
        )
        worker_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.worker, self.active), server)
        self.proposer = None
        if config.engine == "torch":
            engine = self.aengine.engine
            self.proposer = build_proposer(config, engine.model_config.vocab_size, self.telemetry)
            engine.set_proposer(self.proposer)  # the engine thread is idle until the server starts

    async def _close(self) -> None:
        await self.worker.peers.close()
        if isinstance(self.proposer, DraftProposer):
            self.proposer.close()
        if self.receiver is not None:
            await asyncio.to_thread(self.receiver.close)
