"""Build the decode worker from its config (used by __main__ and by tests)."""

from __future__ import annotations

import asyncio

from services.common.worker_app import WorkerApp
from shared.engine import KV_HANDOFF_ENGINE
from shared.kv.collective_receiver import CollectiveKvReceiver
from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc

from .draft_client import DraftProposer, build_proposer
from .handoff import EngineHandoff, KvHandoff, PrefillPeers, TensorHandoff
from .servicer import DecodeServicer
from .trtllm_draft import draft_client_factory
from .worker import DecodeWorker


class DecodeApp(WorkerApp):
    role = "decode"

    def _service_names(self):
        return [worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]

    def _draft_client_factory(self):
        """The trtllm engine's drafter talks to the draft service through this client."""
        if self.config.speculation != "draft":
            return None
        return draft_client_factory(self.config.draft_addr, self.config.draft_timeout_s, self.tls)

    def _add_servicers(self, server) -> None:
        config = self.config
        self.receiver = None
        peers = PrefillPeers(self.telemetry.client_interceptors(), self.tls)
        handoff: KvHandoff
        if self.aengine.info().kv_handoff == KV_HANDOFF_ENGINE:  # e.g. TensorRT-LLM's cache transceiver
            handoff = EngineHandoff(peers)
        else:
            if config.kv_transport == "collective":
                host = config.advertise_address.rpartition(":")[0] or "127.0.0.1"
                self.receiver = CollectiveKvReceiver(
                    host, config.kv_receiver_port, device=config.device, timeout_s=config.kv_timeout_s
                )
            handoff = TensorHandoff(
                self.aengine,
                peers,
                transport=config.kv_transport,
                chunk_bytes=config.kv_chunk_bytes,
                kv_timeout_s=config.kv_timeout_s,
                receiver=self.receiver,
            )
        self.worker = DecodeWorker(self.aengine, self.telemetry, handoff=handoff, peers=peers)
        worker_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.worker, self.active), server)
        self.proposer = None
        if config.engine == "torch":  # the trtllm engine's drafter is set when it is built
            self.proposer = build_proposer(config, self.aengine.info().vocab_size, self.telemetry, self.tls)
            if self.proposer is not None:
                self.aengine.set_proposer(self.proposer)

    async def _close(self) -> None:
        await self.worker.peers.close()
        if isinstance(self.proposer, DraftProposer):
            self.proposer.close()
        if self.receiver is not None:
            await asyncio.to_thread(self.receiver.close)
