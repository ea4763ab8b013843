"""gRPC servicer of the prefill worker: PrefillRequest -> PrefillJob, events -> PrefillResponses."""

from __future__ import annotations

from services.common.convert import logprob_to_pb, sampling_from_pb
from services.common.errors import InvalidArgument
from services.common.worker_app import ActiveRequests
from shared.kv.chunks import KvChunk
from shared.kv.collective import TransferMeta
from shared.pb.tandem.v1 import kv_pb2, worker_pb2, worker_pb2_grpc

from .worker import PrefillDone, PrefillJob, PrefillWorker

_TRANSPORTS = {kv_pb2.KV_TRANSPORT_GRPC: "grpc", kv_pb2.KV_TRANSPORT_COLLECTIVE: "collective"}


def job_from_pb(
    req: worker_pb2.PrefillRequest, default_transport: str, default_chunk_bytes: int
) -> PrefillJob:
    target = req.kv_target
    transport = _TRANSPORTS.get(target.transport, default_transport)
    if transport == "collective" and not (target.receiver_address and target.pair_name):
        raise InvalidArgument("kv_target", "the collective transport needs receiver_address and pair_name")
    return PrefillJob(
        request_id=req.request_id,
        prompt_token_ids=list(req.prompt_token_ids),
        params=sampling_from_pb(req.sampling),
        transport=transport,
        max_chunk_bytes=target.max_chunk_bytes or default_chunk_bytes,
        receiver_address=target.receiver_address,
        pair_name=target.pair_name,
        kv_cache_dtype=target.kv_cache_dtype,
    )


def chunk_to_pb(chunk: KvChunk) -> worker_pb2.PrefillResponse:
    return worker_pb2.PrefillResponse(
        kv_chunk=kv_pb2.KvChunk(
            index=chunk.index,
            total=chunk.total,
            slice=kv_pb2.KvSlice(
                layer_start=chunk.layer_start,
                num_layers=chunk.layer_end - chunk.layer_start,
                token_start=chunk.token_start,
                num_tokens=chunk.token_end - chunk.token_start,
                dtype=chunk.dtype,
                shape=chunk.shape,
            ),
            data=chunk.data,
            crc32=chunk.crc32,
        )
    )


def meta_to_pb(meta: TransferMeta) -> worker_pb2.PrefillResponse:
    num_layers, _, num_tokens = meta.shape[:3]
    return worker_pb2.PrefillResponse(
        kv_meta=kv_pb2.KvCollectiveMeta(
            index=0,
            total=1,
            slice=kv_pb2.KvSlice(
                layer_start=0,
                num_layers=num_layers,
                token_start=0,
                num_tokens=num_tokens,
                dtype=meta.dtype,
                shape=meta.shape,
            ),
            transfer_id=meta.transfer_id,
            pair_name=meta.pair_name,
            epoch=meta.epoch,
            seq=meta.seq,
            nbytes=meta.nbytes,
            checksum_kind=meta.checksum_kind,
            checksum=meta.checksum,
        )
    )


def done_to_pb(done: PrefillDone) -> worker_pb2.PrefillResponse:
    return worker_pb2.PrefillResponse(
        result=worker_pb2.PrefillResult(
            first_token_id=done.first_token_id,
            first_logprob=logprob_to_pb(done.first_logprob) if done.first_logprob is not None else None,
            num_prompt_tokens=done.num_prompt_tokens,
            num_cached_tokens=done.num_cached_tokens,
            num_kv_pieces=done.num_kv_pieces,
            kv_bytes=done.kv_bytes,
            engine_handoff=done.engine_handoff,
        )
    )


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, active: ActiveRequests, *, transport: str, chunk_bytes: int):
        self._worker = worker
        self._active = active
        self._transport = transport
        self._chunk_bytes = chunk_bytes

    async def Prefill(self, request: worker_pb2.PrefillRequest, context):
        job = job_from_pb(request, self._transport, self._chunk_bytes)
        with self._active:
            async for event in self._worker.prefill(job):
                if isinstance(event, KvChunk):
                    yield chunk_to_pb(event)
                elif isinstance(event, TransferMeta):
                    yield meta_to_pb(event)
                else:
                    yield done_to_pb(event)
