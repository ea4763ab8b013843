"""Prefill one prompt for a decode worker: compute its KV, ship it, return the first token.

The request runs in the engine with `hold_kv=True, max_tokens=1`: prefix cache and chunked
prefill apply as for any request, and when the first token is sampled the blocks stay held.
The KV is exported (a copy), the blocks are released at once (full ones stay in the prefix
cache for later prompts), and the copy is shipped:
- grpc transport: checksummed `KvChunk`s, yielded for the response stream;
- collective transport: the tensor is submitted to the pair's sender (shared.kv.collective),
  whose `TransferMeta` is yielded for the stream; the bytes go over the pair group.
The last event is `PrefillDone`. This module knows nothing of protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from shared.engine import AsyncEngine, SamplingParams, TokenLogprobs
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


@dataclass
class PrefillDone:
    first_token_id: int
    first_logprob: TokenLogprobs | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_kv_pieces: int
    kv_bytes: int
    engine_handoff: bytes = b""  # trtllm engine: see PrefillResult.engine_handoff


class PrefillWorker:
    def __init__(self, aengine: AsyncEngine, senders: KvSenderPool, telemetry: Telemetry):
        self._aengine = aengine
        self._senders = senders
        self._telemetry = telemetry

    async def prefill(self, job: PrefillJob) -> AsyncIterator[KvChunk | TransferMeta | PrefillDone]:
        rid = job.request_id
        # Only the first token is sampled here; EOS or a stop token is the decode worker's call.
        params = dataclasses.replace(job.params, max_tokens=1, ignore_eos=True, stop_token_ids=[])
        first = None
        held = False
        try:
            with self._telemetry.span(
                "prefill", request_id=rid, prompt_tokens=len(job.prompt_token_ids)
            ) as sp:
                async for out in self._aengine.generate(rid, job.prompt_token_ids, params, hold_kv=True):
                    if out.new_token_ids:
                        first = out
                if first is None or not first.finished:
                    raise RuntimeError(f"prefill of {rid} ended without a first token")
                held = True
                annotate(sp, cached_tokens=first.num_cached_tokens, queue_seconds=first.queue_seconds)
                self._telemetry.metrics.prompt_tokens.inc(len(job.prompt_token_ids))
                if first.queue_seconds is not None:
                    self._telemetry.metrics.queue_time_seconds.observe(first.queue_seconds)
                kv = await self._aengine.call(lambda eng: eng.export_kv(rid))  # [L, 2, T, Hkv, D], a copy
                await self._aengine.call(lambda eng: eng.release(rid))
                held = False
            num_pieces = kv_bytes = 0
            start = time.perf_counter()
            with self._telemetry.span("kv_transfer", request_id=rid, kv_transport=job.transport) as sp:
                if job.transport == "collective":
                    sender = self._senders.get(job.receiver_address, job.pair_name)
                    pending = await asyncio.to_thread(
                        sender.submit, kv
                    )  # checksum, then queued for the group
                    yield pending.meta
                    await pending.wait_async()
                    num_pieces, kv_bytes = 1, pending.meta.nbytes
                else:
                    async for chunk in _chunks_off_loop(split_kv(kv, job.max_chunk_bytes)):
                        yield chunk
                        num_pieces, kv_bytes = num_pieces + 1, kv_bytes + len(chunk.data)
                seconds = time.perf_counter() - start
                annotate(sp, kv_bytes=kv_bytes, kv_seconds=seconds, kv_pieces=num_pieces)
            log.debug(
                "KV of %s sent: %d bytes in %d pieces, %.4f s (%s)",
                rid,
                kv_bytes,
                num_pieces,
                seconds,
                job.transport,
            )
            yield PrefillDone(
                first_token_id=first.new_token_ids[0],
                first_logprob=first.logprobs[0] if first.logprobs else None,
                num_prompt_tokens=len(job.prompt_token_ids),
                num_cached_tokens=first.num_cached_tokens,
                num_kv_pieces=num_pieces,
                kv_bytes=kv_bytes,
            )
        finally:
            if held:  # cancelled between the first token and the release
                await asyncio.shield(self._aengine.abort(rid))


async def _chunks_off_loop(chunks: Iterator[KvChunk]) -> AsyncIterator[KvChunk]:
    """Cut chunks (device copy, bytes, crc32) in a thread, so the event loop keeps serving."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, chunks, done)
        if chunk is done:
            return
        yield chunk
