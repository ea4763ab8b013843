"""Prefill one prompt for a decode worker: compute its KV, ship it, return the first token.

The engine's `prefill` (engine interface) runs the context phase (prefix cache and chunked
prefill apply as for any request), samples the first token, and hands the KV over in one of
two ways, the KV hand-off strategy of the prefill side:
- as a tensor, its blocks already released (the torch engine): the copy is shipped
  - grpc transport: checksummed `KvChunk`s, yielded for the response stream;
  - collective transport: the tensor is submitted to the pair's sender (shared.kv.collective),
    whose `TransferMeta` is yielded for the stream; the bytes go over the pair group;
- as the engine's own handoff (TensorRT-LLM): only its bytes go in `PrefillDone`, and the
  decode worker's engine pulls the KV from this one.
The last event is `PrefillDone`. This module knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from services.common.errors import FailedPrecondition
from shared.engine import EngineClient, SamplingParams, TokenLogprobs
from shared.engine.interface import KV_HANDOFF_TENSORS
from shared.kv.chunks import KvChunk, split_kv
from shared.kv.collective import KvSenderPool, TransferMeta
from shared.telemetry import Telemetry, annotate

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # how to sample the first token
    transport: str  # "grpc" | "collective"
    max_chunk_bytes: int = 1 << 20  # grpc transport
    receiver_address: str = ""  # collective transport: the decode worker's KV receiver
    pair_name: str = ""  # collective transport
    kv_cache_dtype: str = ""  # the decode worker's KV type ("" = not checked)


@dataclass
class PrefillDone:
    first_token_id: int
    first_logprob: TokenLogprobs | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_kv_pieces: int
    kv_bytes: int
    engine_handoff: bytes = b""  # the engine moves the KV: see PrefillResult.engine_handoff


ENGINE_TRANSPORT = "trtllm"  # the kv_transport label when the engine moves the KV itself


class PrefillWorker:
    def __init__(self, engine: EngineClient, senders: KvSenderPool, telemetry: Telemetry):
        self._engine = engine
        self._senders = senders
        self._telemetry = telemetry

    async def prefill(self, job: PrefillJob) -> AsyncIterator[KvChunk | TransferMeta | PrefillDone]:
        rid = job.request_id
        mine = self._engine.info()
        if job.kv_cache_dtype and mine.kv_handoff == KV_HANDOFF_TENSORS and job.kv_cache_dtype != mine.kv_dtype:
            # its bytes could not go into the decode worker's blocks: refuse before any work
            raise FailedPrecondition(
                f"kv_target.kv_cache_dtype: the decode worker's KV cache is {job.kv_cache_dtype}, this "
                f"prefill worker's is {mine.kv_dtype}; set TANDEM_KV_CACHE_DTYPE (and TANDEM_DTYPE) alike on both"
            )
        with self._telemetry.span("prefill", request_id=rid, prompt_tokens=len(job.prompt_token_ids)) as sp:
            # only the first token is sampled here; EOS or a stop token is the decode worker's call
            out = await self._engine.prefill(rid, job.prompt_token_ids, job.params)
            first = out.first
            annotate(sp, cached_tokens=first.num_cached_tokens, queue_seconds=first.queue_seconds)
            if out.kv is None:
                annotate(sp, kv_transport=ENGINE_TRANSPORT)
        self._telemetry.metrics.prompt_tokens.inc(len(job.prompt_token_ids))
        if first.queue_seconds is not None:
            self._telemetry.metrics.queue_time_seconds.observe(first.queue_seconds)
        num_pieces = kv_bytes = 0
        if out.kv is not None:
            async for event in self._ship(job, out.kv):
                if isinstance(event, tuple):
                    num_pieces, kv_bytes = event
                else:
                    yield event
        yield PrefillDone(
            first_token_id=first.new_token_ids[0],
            first_logprob=first.logprobs[0] if first.logprobs else None,
            num_prompt_tokens=len(job.prompt_token_ids),
            num_cached_tokens=first.num_cached_tokens,
            num_kv_pieces=num_pieces,
            kv_bytes=kv_bytes,
            engine_handoff=out.handoff,
        )

    async def _ship(self, job: PrefillJob, kv) -> AsyncIterator[KvChunk | TransferMeta | tuple[int, int]]:
        """Ship the exported KV; the last item is (num_pieces, num_bytes)."""
        rid = job.request_id
        num_pieces = kv_bytes = 0
        start = time.perf_counter()
        with self._telemetry.span("kv_transfer", request_id=rid, kv_transport=job.transport) as sp:
            if job.transport == "collective":
                sender = self._senders.get(job.receiver_address, job.pair_name)
                pending = await asyncio.to_thread(sender.submit, kv)  # checksum, then queued for the group
                yield pending.meta
                await pending.wait_async()
                num_pieces, kv_bytes = 1, pending.meta.nbytes
            else:
                async for chunk in _chunks_off_loop(split_kv(kv, job.max_chunk_bytes)):
                    yield chunk
                    num_pieces, kv_bytes = num_pieces + 1, kv_bytes + len(chunk.data)
            seconds = time.perf_counter() - start
            annotate(sp, kv_bytes=kv_bytes, kv_seconds=seconds, kv_pieces=num_pieces)
        log.debug("KV of %s sent: %d bytes in %d pieces, %.4f s (%s)", rid, kv_bytes, num_pieces, seconds, job.transport)
        yield num_pieces, kv_bytes


async def _chunks_off_loop(chunks: Iterator[KvChunk]) -> AsyncIterator[KvChunk]:
    """Cut chunks (device copy, bytes, crc32) in a thread, so the event loop keeps serving."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, chunks, done)
        if chunk is done:
            return
        yield chunk
