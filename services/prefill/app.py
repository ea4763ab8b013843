"""Build the prefill worker from its config (used by __main__ and by tests)."""

from __future__ import annotations

import asyncio

from services.common.worker_app import WorkerApp
from shared.kv.collective import KvSenderPool
from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc

from .servicer import PrefillServicer
from .worker import PrefillWorker


class PrefillApp(WorkerApp):
    role = "prefill"

    def _service_names(self):
        return [worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]

    def _add_servicers(self, server) -> None:
        # gloo listens on this worker's advertised host only (see docs/security.md)
        host = self.config.advertise_address.rpartition(":")[0] or "127.0.0.1"
        self.senders = KvSenderPool(device=self.config.device, timeout_s=self.config.kv_timeout_s, host=host)
        # how the KV leaves follows the engine (engine interface: PrefillOutput.kv or .handoff)
        self.worker = PrefillWorker(self.aengine, self.senders, self.telemetry)
        worker_pb2_grpc.add_PrefillServicer_to_server(
            PrefillServicer(
                self.worker,
                self.active,
                transport=self.config.kv_transport,
                chunk_bytes=self.config.kv_chunk_bytes,
            ),
            server,
        )

    async def _close(self) -> None:
        await asyncio.to_thread(self.senders.close)
