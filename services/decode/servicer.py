"""gRPC servicer of the decode worker: DecodeRequest -> DecodeJob, outputs -> DecodeResponses."""

from __future__ import annotations

from services.common.convert import output_to_pb, sampling_from_pb
from services.common.worker_app import ActiveRequests
from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc

from .worker import DecodeJob, DecodeWorker


def job_from_pb(req: worker_pb2.DecodeRequest, timeout_s: float | None = None) -> DecodeJob:
    return DecodeJob(
        request_id=req.request_id,
        prompt_token_ids=list(req.prompt_token_ids),
        params=sampling_from_pb(req.sampling, req.stopping),
        sampling_pb=req.sampling,
        prefill_peer=req.prefill_peer,
        timeout_s=timeout_s,
    )


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, active: ActiveRequests):
        self._worker = worker
        self._active = active

    async def Generate(self, request: worker_pb2.DecodeRequest, context):
        job = job_from_pb(request, context.time_remaining())
        with self._active:
            async for out, prefilled_by in self._worker.generate(job):
                yield output_to_pb(out, prefilled_by=prefilled_by)
