"""One request on a decode worker: prefill (locally or on a peer), then continuous batching.

Disaggregated path, with a prefill peer:
  validate -> reserve blocks for the prompt -> Prefill call to the peer with a KV target ->
  import the KV pieces as they arrive -> add_prefilled(first token) -> stream the engine's
  outputs (the first token is emitted here, the engine's outputs start at the second).
The decode worker owns the blocks it reserved: any failure or cancellation aborts the
request (which frees them) and cancels the call to the peer, which then aborts too.
If the peer cannot be reached before any KV arrived, the prompt is prefilled locally.

Local path, without a peer: the engine's own `generate` (prefix cache, chunked prefill).
This module knows nothing of protobuf beyond the peer call it makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from services.common.convert import logprob_from_pb
from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.common.server import CHANNEL_OPTIONS
from shared.engine import AsyncEngine, RequestOutput, SamplingParams
from shared.kv.chunks import KvChunk
from shared.kv.collective import TransferMeta
from shared.kv.collective_receiver import CollectiveKvReceiver
from shared.kv.errors import KvShapeMismatch, KvTransferError, KvTransferTimeout
from shared.pb.tandem.v1 import common_pb2, kv_pb2, worker_pb2, worker_pb2_grpc
from shared.telemetry import Telemetry, annotate

from .draft_client import SpecTally, spec_attributes
from .kv_import import KvImporter

log = logging.getLogger(__name__)


@dataclass
class DecodeJob:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling_pb: common_pb2.SamplingParameters  # forwarded to the prefill peer as is
    prefill_peer: str = ""  # host:port, or "" to prefill locally
    timeout_s: float | None = None  # what was left of the caller's deadline when the job arrived
    deadline: float | None = None  # time.monotonic() of that deadline (set from timeout_s)

    def __post_init__(self) -> None:
        if self.deadline is None and self.timeout_s is not None:
            self.deadline = time.monotonic() + self.timeout_s

    def remaining_s(self) -> float | None:
        """What is left of the caller's deadline now (None: no deadline); every call downstream
        gets it, so the prefill peer stops when the client's deadline passes."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class PrefillOutcome:
    first_token_id: int
    first_logprob: common_pb2.TokenLogprob | None
    num_cached_tokens: int
    kv_bytes: int
    kv_seconds: float  # first KV piece received to the last one imported


class PrefillPeerUnavailable(Exception):
    """The prefill peer failed, or its KV cannot be trusted, before the request started
    decoding: it died or stopped, failed, stalled past TANDEM_KV_TIMEOUT_S, sent a chunk that
    failed its checksum, too few chunks, or KV of the wrong shape. Nothing was emitted and the
    reservation is freed (the bad KV never reached the prefix cache): prefilling locally is safe."""


class PrefillPeers:
    """Channels to prefill workers, opened on first use and kept."""

    def __init__(self, interceptors=()) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._interceptors = list(interceptors)

    def stub(self, address: str) -> worker_pb2_grpc.PrefillStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS, interceptors=self._interceptors
            )
        return worker_pb2_grpc.PrefillStub(channel)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()


class DecodeWorker:
    def __init__(
        self,
        aengine: AsyncEngine,
        telemetry: Telemetry,
        *,
        transport: str,
        chunk_bytes: int,
        kv_timeout_s: float,
        receiver: CollectiveKvReceiver | None = None,
    ):
        self._aengine = aengine
        self._transport = transport
        self._chunk_bytes = chunk_bytes
        self._kv_timeout_s = kv_timeout_s
        self._receiver = receiver
        self._telemetry = telemetry
        self.peers = PrefillPeers(telemetry.client_interceptors())
        mc = aengine.engine.model_config
        self._kv_geometry = (mc.num_layers, 2, mc.num_kv_heads, mc.head_dim)
        self._kv_dtype = aengine.engine.config.dtype
        self.num_local_prefills = 0
        self.num_remote_prefills = 0
        self.num_prefill_fallbacks = 0  # disaggregated requests prefilled locally after all

    async def generate(self, job: DecodeJob) -> AsyncIterator[tuple[RequestOutput, str]]:
        """(output, prefilled_by) pairs; prefilled_by is the peer's address or "" (local)."""
        # the request's server span parents the draft calls made for it (see draft_client.py)
        with self._telemetry.request_spans.bind(job.request_id):
            async for item in self._generate(job):
                yield item

    async def _generate(self, job: DecodeJob) -> AsyncIterator[tuple[RequestOutput, str]]:
        generated = self._telemetry.metrics.generation_tokens
        spec = SpecTally(self._telemetry.metrics)
        if job.prefill_peer:
            try:
                async for out in self._generate_disaggregated(job):
                    generated.inc(len(out.new_token_ids))
                    spec.observe(out)
                    yield out, job.prefill_peer
                return
            except PrefillPeerUnavailable as e:
                self.num_prefill_fallbacks += 1
                log.warning(
                    "prefill peer %s unavailable (%s): prefilling %s locally",
                    job.prefill_peer,
                    e,
                    job.request_id,
                )
                remaining = job.remaining_s()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(f"deadline passed while prefilling on {e}") from None
        self.num_local_prefills += 1
        self._telemetry.metrics.prompt_tokens.inc(len(job.prompt_token_ids))
        queued = None  # seconds the request waited in the engine's queue, once known
        with self._telemetry.span("decode", request_id=job.request_id, disaggregated=False) as sp:
            async for out in self._aengine.generate(job.request_id, job.prompt_token_ids, job.params):
                generated.inc(len(out.new_token_ids))
                spec.observe(out)
                if queued is None and out.queue_seconds is not None:
                    queued = out.queue_seconds
                    self._telemetry.metrics.queue_time_seconds.observe(queued)
                annotate(
                    sp,
                    completion_tokens=out.num_output_tokens,
                    cached_tokens=out.num_cached_tokens,
                    queue_seconds=out.queue_seconds,
                    **spec_attributes(out),
                )
                yield out, ""

    async def _generate_disaggregated(self, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        rid, prompt, params = job.request_id, job.prompt_token_ids, job.params
        await self._aengine.call(lambda eng: eng.validate_request(prompt, params))
        stream_done = False  # the engine stream ran to its end (and dropped its queue itself)
        # Opened before the reservation, so that the clean-up below covers a caller cancelled
        # while the reserve command waits for the engine thread (it reserves all the same), and
        # before add_prefilled, so that no output is missed.
        queue = self._aengine.open_stream(rid)
        try:
            if not await self._aengine.call(lambda eng: eng.reserve(rid, len(prompt))):
                stats = self._aengine.stats()
                raise ResourceExhausted(
                    f"not enough free KV blocks for a {len(prompt)}-token prompt "
                    f"({stats.num_free_blocks} of {stats.num_total_blocks} free)"
                )
            outcome = await self._prefill_on_peer_traced(job)
            first_lp = logprob_from_pb(outcome.first_logprob) if outcome.first_logprob is not None else None
            done = await self._aengine.call(
                lambda eng: eng.add_prefilled(rid, prompt, outcome.first_token_id, params, first_lp)
            )
            self.num_remote_prefills += 1
            first = RequestOutput(
                request_id=rid,
                new_token_ids=[outcome.first_token_id],
                finished=done is not None,
                finish_reason=done.finish_reason if done is not None else None,
                logprobs=[first_lp] if first_lp is not None else None,
                num_prompt_tokens=len(prompt),
                num_cached_tokens=outcome.num_cached_tokens,
                num_output_tokens=1,
            )
            yield first
            if first.finished:  # the first token ended it; the engine freed the reservation
                return
            with self._telemetry.span("decode", request_id=rid, disaggregated=True) as sp:
                async for out in self._aengine.stream(rid, queue):
                    # the engine counts no cached tokens for an imported prompt; the peer's count holds
                    out.num_cached_tokens = outcome.num_cached_tokens
                    stream_done = out.finished
                    annotate(sp, completion_tokens=out.num_output_tokens, **spec_attributes(out))
                    yield out
        finally:
            if not stream_done:
                # frees the reservation or the running request (a no-op when already finished)
                # and drops the output queue, unless a newer request reusing the id took it over
                await asyncio.shield(self._aengine.close_stream(rid, queue))

    async def _prefill_on_peer_traced(self, job: DecodeJob) -> PrefillOutcome:
        """_prefill_on_peer in a `kv_transfer` span, and the transfer in the metrics."""
        start = time.perf_counter()
        block_size = self._aengine.engine.block_size
        with self._telemetry.span(
            "kv_transfer",
            request_id=job.request_id,
            prefill_worker=job.prefill_peer,
            kv_transport=self._transport,
            kv_blocks=-(-len(job.prompt_token_ids) // block_size),
        ) as sp:
            outcome = await self._prefill_on_peer(job)
            annotate(
                sp,
                kv_bytes=outcome.kv_bytes,
                kv_seconds=outcome.kv_seconds,
                prefill_seconds=time.perf_counter() - start,
                cached_tokens=outcome.num_cached_tokens,
            )
        self._telemetry.metrics.record_kv_transfer(self._transport, outcome.kv_bytes, outcome.kv_seconds)
        log.debug(
            "KV of %s from %s: %d bytes in %.4f s (%s)",
            job.request_id,
            job.prefill_peer,
            outcome.kv_bytes,
            outcome.kv_seconds,
            self._transport,
        )
        return outcome

    async def _prefill_on_peer(self, job: DecodeJob) -> PrefillOutcome:
        """Have the peer prefill the prompt into our reserved blocks; returns its first token."""
        target = kv_pb2.KvTarget(max_chunk_bytes=self._chunk_bytes)
        if self._transport == "collective" and self._receiver is not None:
            target.transport = kv_pb2.KV_TRANSPORT_COLLECTIVE
            target.receiver_address = self._receiver.address
            # one pair group per (prefill peer, this decode worker): the receiver is ours alone
            target.pair_name = f"prefill@{job.prefill_peer}"
        else:
            target.transport = kv_pb2.KV_TRANSPORT_GRPC
        request = worker_pb2.PrefillRequest(
            request_id=job.request_id,
            prompt_token_ids=job.prompt_token_ids,
            sampling=job.sampling_pb,
            kv_target=target,
        )
        num_layers, two, num_kv_heads, head_dim = self._kv_geometry
        shape = (num_layers, two, len(job.prompt_token_ids), num_kv_heads, head_dim)
        importer = KvImporter(
            self._aengine, job.request_id, shape, self._kv_dtype, self._receiver, timeout_s=self._kv_timeout_s
        )
        call = self.peers.stub(job.prefill_peer).Prefill(request, timeout=job.remaining_s())
        peer = job.prefill_peer
        try:
            while True:
                # a stalled peer (or transfer) fails the prefill after TANDEM_KV_TIMEOUT_S of silence
                try:
                    msg = await asyncio.wait_for(call.read(), self._kv_timeout_s)
                except asyncio.TimeoutError:
                    raise KvTransferTimeout(f"nothing from {peer} for {self._kv_timeout_s:.0f}s") from None
                if msg is grpc.aio.EOF:
                    raise PrefillPeerUnavailable(f"{peer} ended its stream without a result")
                kind = msg.WhichOneof("kind")
                if kind == "kv_chunk":
                    importer.add_chunk(chunk_from_pb(msg.kv_chunk))
                elif kind == "kv_meta":
                    await importer.add_collective(meta_from_pb(msg.kv_meta))
                elif kind == "result":
                    await importer.finish()  # raises unless every piece arrived and passed its checksum
                    r = msg.result
                    if r.num_prompt_tokens and r.num_prompt_tokens != len(job.prompt_token_ids):
                        raise KvShapeMismatch(
                            f"{peer} prefilled {r.num_prompt_tokens} tokens, the prompt has "
                            f"{len(job.prompt_token_ids)}"
                        )
                    # the result is the last message: let the call end with its own status rather
                    # than cancel it on the way out (a cancelled call is traced as CANCELLED)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(call.code(), self._kv_timeout_s)
                    return PrefillOutcome(
                        r.first_token_id,
                        r.first_logprob if r.HasField("first_logprob") else None,
                        r.num_cached_tokens,
                        importer.num_bytes,
                        importer.seconds,
                    )
        except grpc.aio.AioRpcError as e:
            # whatever the peer's trouble (down, stopping, failed, even refusing the request the
            # engine here accepted), this worker can still prefill the prompt itself
            raise PrefillPeerUnavailable(f"{peer}: {e.code().name}: {e.details()}") from None
        except (KvTransferError, ValueError) as e:  # ValueError: a piece outside the reservation
            raise PrefillPeerUnavailable(f"KV from {peer} rejected: {type(e).__name__}: {e}") from None
        finally:
            call.cancel()  # the peer aborts and frees its blocks
            await importer.close()  # no import may land after the reservation is freed


def chunk_from_pb(c: kv_pb2.KvChunk) -> KvChunk:
    s = c.slice
    return KvChunk(
        index=c.index,
        total=c.total,
        layer_start=s.layer_start,
        layer_end=s.layer_start + s.num_layers,
        token_start=s.token_start,
        token_end=s.token_start + s.num_tokens,
        dtype=s.dtype,
        shape=tuple(s.shape),
        data=c.data,
        crc32=c.crc32,
    )


def meta_from_pb(m: kv_pb2.KvCollectiveMeta) -> TransferMeta:
    return TransferMeta(
        transfer_id=m.transfer_id,
        pair_name=m.pair_name,
        epoch=m.epoch,
        seq=m.seq,
        shape=tuple(m.slice.shape),
        dtype=m.slice.dtype,
        nbytes=m.nbytes,
        checksum=m.checksum,
        checksum_kind=m.checksum_kind,
    )
