"""One request on a decode worker: prefill (locally or on a peer), then continuous batching.

Disaggregated path, with a prefill peer (engine interface verbs in brackets):
  [reserve] room for the prompt -> the KV hand-off strategy (handoff.py) has the peer prefill
  it and brings its KV in ([import_kv], or an engine handoff) -> [add_prefilled] with the
  first token -> stream the engine's outputs (the first token is emitted here, the engine's
  outputs start at the second).
The decode worker owns what it reserved: any failure or cancellation [release]s it, and the
call to the peer is cancelled, so the peer aborts too. If the peer cannot be reached before
any KV arrived, the prompt is prefilled locally.

Local path, without a peer: the engine's own [generate] (prefix cache, chunked prefill).
Uses the engine only through shared/engine/interface.py; knows no protobuf beyond the job's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.common.convert import logprob_from_pb
from services.common.errors import DeadlineExceeded, ResourceExhausted
from shared.engine import EngineClient, FirstToken, RequestOutput, SamplingParams
from shared.pb.tandem.v1 import common_pb2
from shared.telemetry import Telemetry, annotate

from .draft_client import SpecTally, spec_attributes
from .handoff import KvHandoff, PeerJob, PrefillOutcome, PrefillPeers, PrefillPeerUnavailable

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


class DecodeWorker:
    def __init__(self, engine: EngineClient, telemetry: Telemetry, *, handoff: KvHandoff, peers: PrefillPeers):
        self._engine = engine
        self.handoff = handoff
        self._telemetry = telemetry
        self.peers = peers
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
        # prompt logprobs need every prompt token's logits: this worker prefills such a request itself
        if job.prefill_peer and job.params.prompt_logprobs is None:
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
            async for out in self._engine.generate(job.request_id, job.prompt_token_ids, job.params):
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
        # validates (InvalidRequest); a caller cancelled while the engine reserves leaves nothing
        # reserved (the engine's reserve cleans up after itself)
        reservation = await self._engine.reserve(rid, prompt, params)
        if reservation is None:
            stats = self._engine.stats()
            raise ResourceExhausted(
                f"not enough free KV blocks for a {len(prompt)}-token prompt "
                f"({stats.num_free_blocks} of {stats.num_total_blocks} free)"
            )
        stream_done = False  # the engine stream ran to its end (and let go of the request itself)
        try:
            outcome = await self._fetch_traced(job, reservation)
            first_lp = logprob_from_pb(outcome.first_logprob) if outcome.first_logprob is not None else None
            prefilled = await self._engine.add_prefilled(
                reservation, FirstToken(outcome.first_token_id, first_lp, outcome.num_cached_tokens), outcome.handoff
            )
            self.num_remote_prefills += 1
            yield RequestOutput(
                request_id=rid,
                new_token_ids=[outcome.first_token_id],
                finished=prefilled.finish is not None,
                finish_reason=prefilled.finish,
                logprobs=[first_lp] if first_lp is not None else None,
                num_prompt_tokens=len(prompt),
                num_cached_tokens=outcome.num_cached_tokens,
                num_output_tokens=1,
            )
            if prefilled.finish is not None:  # the first token ended it; the engine freed the room
                return
            with self._telemetry.span("decode", request_id=rid, disaggregated=True) as sp:
                async for out in prefilled.outputs:
                    stream_done = out.finished
                    annotate(sp, completion_tokens=out.num_output_tokens, **spec_attributes(out))
                    yield out
        finally:
            if not stream_done:
                # frees the reservation or the running request (a no-op when already finished),
                # never a newer request reusing the id
                await asyncio.shield(self._engine.release(reservation))

    async def _fetch_traced(self, job: DecodeJob, reservation) -> PrefillOutcome:
        """The hand-off strategy's fetch in a `kv_transfer` span, and the transfer in the metrics."""
        start = time.perf_counter()
        transport = self.handoff.transport
        block_size = self._engine.info().block_size
        with self._telemetry.span(
            "kv_transfer",
            request_id=job.request_id,
            prefill_worker=job.prefill_peer,
            kv_transport=transport,
            kv_blocks=-(-len(job.prompt_token_ids) // block_size),
        ) as sp:
            peer_job = PeerJob(
                job.request_id, job.prompt_token_ids, job.sampling_pb, job.prefill_peer, job.remaining_s()
            )
            outcome = await self.handoff.fetch(peer_job, reservation)
            annotate(
                sp,
                kv_bytes=outcome.kv_bytes,
                kv_seconds=outcome.kv_seconds,
                prefill_seconds=time.perf_counter() - start,
                cached_tokens=outcome.num_cached_tokens,
            )
        self._telemetry.metrics.record_kv_transfer(transport, outcome.kv_bytes, outcome.kv_seconds)
        log.debug(
            "KV of %s from %s: %d bytes in %.4f s (%s)",
            job.request_id,
            job.prefill_peer,
            outcome.kv_bytes,
            outcome.kv_seconds,
            transport,
        )
        return outcome
