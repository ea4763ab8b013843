"""The prefill and decode workers' request paths with the TensorRT-LLM engine (TANDEM_ENGINE=trtllm).

Same RPCs, same scheduler, same Prefill stream as with the torch engine; what travels in it
differs. With torch, the stream carries the prompt's KV (or its collective metadata); with
TensorRT-LLM it carries only `PrefillResult.engine_handoff`, the context phase's
DisaggregatedParams, and the decode worker's `generation_only` request makes TensorRT-LLM's
cache transceiver pull the KV from the prefill worker's GPU (UCX/NIXL).

  decode worker                                   prefill worker
  Prefill(request) ------------------------------> context_only request (first token)
  <------------- PrefillResult(first token, engine_handoff)
  yield the first token
  generation_only(handoff) ... KV pulled GPU to GPU, then streamed tokens

The prefill worker samples only the first token, ignoring EOS and stop tokens, exactly as the
torch path does: whether that token ends the request is the decode worker's call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator

import grpc

from services.common.convert import logprob_from_pb
from services.common.errors import Unavailable
from services.decode.worker import DecodeJob, DecodeWorker, PrefillPeerUnavailable
from services.prefill.worker import PrefillDone, PrefillJob
from shared.config import WorkerConfig
from shared.engine import RequestOutput
from shared.kv.errors import KvTransferError
from shared.pb.tandem.v1 import kv_pb2, worker_pb2
from shared.telemetry import Telemetry, annotate

from .trtllm_config import TrtllmSettings, read_model_info
from .trtllm_convert import Handoff
from .trtllm_draft import GrpcDraftClient
from .trtllm_engine import TrtllmEngine, first_token_finish

TRANSPORT = "trtllm"  # the kv_transport label of spans and metrics


def build_trtllm_engine(config: WorkerConfig) -> TrtllmEngine:
    """Check the settings, load the model into TensorRT-LLM, start the stats poller.

    A decode worker with a draft service (TANDEM_DRAFT_ADDR) speculates through TensorRT-LLM's
    user-provided drafter, whose client is opened in the executor's process."""
    settings = TrtllmSettings.from_worker_config(config)
    factory = None
    if settings.num_speculative_tokens and config.role == "decode":
        factory = functools.partial(
            GrpcDraftClient, settings.draft_addr, getattr(config, "draft_timeout_s", 0.5)
        )
    return TrtllmEngine.build(settings, read_model_info(config.model), draft_client_factory=factory).start()


class TrtllmPrefillWorker:
    """`PrefillWorker.prefill` for TensorRT-LLM: one context_only request, one PrefillDone."""

    def __init__(self, engine: TrtllmEngine, telemetry: Telemetry):
        self._engine = engine
        self._telemetry = telemetry

    async def prefill(self, job: PrefillJob) -> AsyncIterator[PrefillDone]:
        params = dataclasses.replace(job.params, max_tokens=1, ignore_eos=True, stop_token_ids=[])
        prompt = job.prompt_token_ids
        with self._telemetry.span("prefill", request_id=job.request_id, prompt_tokens=len(prompt)) as sp:
            result = await self._engine.prefill(job.request_id, prompt, params)
            annotate(sp, cached_tokens=result.first.num_cached_tokens, kv_transport=TRANSPORT)
        self._telemetry.metrics.prompt_tokens.inc(len(prompt))
        first = result.first
        yield PrefillDone(
            first_token_id=first.new_token_ids[0],
            first_logprob=first.logprobs[0] if first.logprobs else None,
            num_prompt_tokens=len(prompt),
            num_cached_tokens=first.num_cached_tokens,
            num_kv_pieces=0,  # the KV does not travel in this stream
            kv_bytes=0,
            engine_handoff=result.handoff.encode(),
        )


class TrtllmDecodeWorker(DecodeWorker):
    """`DecodeWorker` whose disaggregated path hands the KV transfer to TensorRT-LLM.

    The local path (no prefill peer, or the peer unreachable) is DecodeWorker's own: the
    engine's `generate`, a context_and_generation request."""

    _aengine: TrtllmEngine

    async def _generate_disaggregated(self, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        rid, prompt, params = job.request_id, job.prompt_token_ids, job.params
        self._aengine.validate(prompt, params)
        with self._telemetry.span(
            "kv_transfer", request_id=rid, prefill_worker=job.prefill_peer, kv_transport=TRANSPORT
        ) as sp:
            result = await self._prefill_on_trtllm_peer(job)
            annotate(sp, cached_tokens=result.num_cached_tokens)
        try:
            handoff = Handoff.decode(result.engine_handoff)
        except ValueError as e:
            raise KvTransferError(str(e)) from None
        self.num_remote_prefills += 1
        first_lp = logprob_from_pb(result.first_logprob) if result.HasField("first_logprob") else None
        finish = first_token_finish(params, handoff.first_gen_tokens, self._aengine.info.eos_token_ids)
        first = RequestOutput(
            request_id=rid,
            new_token_ids=[result.first_token_id],
            finished=finish is not None,
            finish_reason=finish,
            logprobs=[first_lp] if first_lp is not None else None,
            num_prompt_tokens=len(prompt),
            num_cached_tokens=result.num_cached_tokens,
            num_output_tokens=1,
        )
        rest = self._aengine.generate_prefilled(
            rid, prompt, params, handoff, num_cached_tokens=result.num_cached_tokens
        )
        if first.finished:
            async for _ in rest:  # pulls the KV, so that the prefill worker frees it now
                pass
            yield first
            return
        yield first
        with self._telemetry.span("decode", request_id=rid, disaggregated=True) as sp:
            async for out in rest:
                annotate(sp, completion_tokens=out.num_output_tokens)
                yield out

    async def _prefill_on_trtllm_peer(self, job: DecodeJob) -> worker_pb2.PrefillResult:
        request = worker_pb2.PrefillRequest(
            request_id=job.request_id,
            prompt_token_ids=job.prompt_token_ids,
            sampling=job.sampling_pb,
            kv_target=kv_pb2.KvTarget(),  # unused: TensorRT-LLM's cache transceiver moves the KV
        )
        call = self.peers.stub(job.prefill_peer).Prefill(request, timeout=job.timeout_s)
        try:
            async for msg in call:
                if msg.WhichOneof("kind") == "result":
                    if not msg.result.engine_handoff:
                        raise Unavailable(
                            f"prefill peer {job.prefill_peer} sent no TensorRT-LLM handoff: "
                            "every worker must run TANDEM_ENGINE=trtllm"
                        )
                    return msg.result
            raise Unavailable(f"prefill peer {job.prefill_peer} ended its stream without a result")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:  # nothing was prefilled for us yet
                raise PrefillPeerUnavailable(e.details()) from None
            raise
        finally:
            call.cancel()
