"""One request's life in the scheduler: validate, tokenize, route, stream, detokenize.

The scheduler validates what only it can see (the prompt text or ids, stop strings, the
request id); sampling parameters are checked by the decode worker's engine, whose
INVALID_ARGUMENT comes back to the client unchanged. The token stream from the decode worker
becomes text through `shared.text.TextStream`; when a stop string completes, the downstream
call is cancelled, so the decode worker aborts the request and frees its blocks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from services.common.errors import InvalidArgument, Unavailable
from shared.pb.tandem.v1 import common_pb2, generate_pb2, worker_pb2
from shared.telemetry import Telemetry, annotate, bind_request_id
from shared.text import TextStream, Tokenizer, validate_stop_strings, validate_token_ids

from .pool import WorkerPool
from .router import NoDecodeWorker, Route, Router

log = logging.getLogger(__name__)

FinishReason = common_pb2.FinishReason


@dataclass
class Job:
    """A validated request, ready to route."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParameters
    stopping: common_pb2.StoppingCriteria  # max_tokens always set; stop strings live in `stops`
    stops: list[str]
    priority: int = 0


@dataclass
class Piece:
    """What the client gets in one response."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)  # passed through from the worker
    finish_reason: int = FinishReason.FINISH_REASON_UNSPECIFIED
    finish_message: str = ""
    usage: common_pb2.Usage | None = None


class Frontend:
    """Turns GenerateRequests into streams of Pieces, through the routed workers."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        pool: WorkerPool,
        router: Router,
        telemetry: Telemetry,
        *,
        default_max_tokens: int,
        max_stop_strings: int,
    ):
        self._tokenizer = tokenizer
        self._pool = pool
        self._router = router
        self._telemetry = telemetry
        self._default_max_tokens = default_max_tokens
        self._max_stop_strings = max_stop_strings
        self._active: set[str] = set()

    # -- validation ---------------------------------------------------------------------
    def prepare(self, req: generate_pb2.GenerateRequest) -> Job:
        """Validate and tokenize; raises InvalidArgument naming the field."""
        kind = req.WhichOneof("prompt")
        if kind is None:
            raise InvalidArgument("prompt", "set either text or token_ids")
        if kind == "text":
            if not req.text:
                raise InvalidArgument("text", "must not be empty")
            prompt = self._tokenizer.encode(req.text)
        else:
            try:
                prompt = validate_token_ids(list(req.token_ids.ids), self._tokenizer.vocab_size, "token_ids")
            except ValueError as e:
                raise InvalidArgument("token_ids", str(e).split(": ", 1)[-1]) from None
        try:
            stops = validate_stop_strings(list(req.stopping.stop), max_count=self._max_stop_strings)
        except ValueError as e:
            raise InvalidArgument("stop", str(e).split(": ", 1)[-1]) from None
        stopping = common_pb2.StoppingCriteria()
        stopping.CopyFrom(req.stopping)
        del stopping.stop[:]
        if not stopping.HasField("max_tokens"):
            stopping.max_tokens = self._default_max_tokens
        if stopping.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {stopping.max_tokens}")
        request_id = req.request_id or uuid.uuid4().hex
        if request_id in self._active:
            raise InvalidArgument("request_id", f"{request_id!r} is already running")
        return Job(request_id, prompt, req.sampling, stopping, stops, req.priority)

    # -- streaming ----------------------------------------------------------------------
    async def generate(self, job: Job, timeout_s: float | None = None) -> AsyncIterator[Piece]:
        """Route the job and stream its pieces; the last one has finish_reason and usage."""
        self._active.add(job.request_id)
        metrics = self._telemetry.metrics
        start = last = time.perf_counter()
        num_tokens = 0
        try:
            with (
                bind_request_id(job.request_id),
                self._telemetry.span(
                    "generate", request_id=job.request_id, prompt_tokens=len(job.prompt_token_ids)
                ) as sp,
            ):
                async for piece in self._generate_with_failover(job, timeout_s):
                    now = time.perf_counter()
                    if piece.token_ids:
                        if num_tokens == 0:
                            metrics.ttft_seconds.observe(now - start)
                        else:  # a piece may carry several tokens: spread the gap over them
                            for _ in piece.token_ids:
                                metrics.inter_token_latency_seconds.observe(
                                    (now - last) / len(piece.token_ids)
                                )
                        num_tokens += len(piece.token_ids)
                        last = now
                    if piece.usage is not None:
                        metrics.e2e_latency_seconds.observe(now - start)
                        metrics.prompt_tokens.inc(piece.usage.prompt_tokens)
                        metrics.generation_tokens.inc(piece.usage.completion_tokens)
                        annotate(
                            sp,
                            completion_tokens=piece.usage.completion_tokens,
                            cached_tokens=piece.usage.cached_tokens,
                            finish_reason=common_pb2.FinishReason.Name(piece.finish_reason),
                        )
                    yield piece
        finally:
            self._active.discard(job.request_id)

    async def _generate_with_failover(self, job: Job, timeout_s: float | None) -> AsyncIterator[Piece]:
        # A decode worker that turns out to be down before it answered anything is skipped
        # and the request goes to the next one.
        for _ in range(max(1, len(self._pool.healthy("decode")))):
            route = await self._route(job)
            started = False
            try:
                async for piece in self._stream(job, route, timeout_s):
                    started = True
                    yield piece
                return
            except grpc.aio.AioRpcError as e:
                if started or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._pool.mark_failed(route.decode, e.details() or "unavailable")
        raise Unavailable("no healthy decode worker answered")

    async def _route(self, job: Job) -> Route:
        with self._telemetry.span("route", request_id=job.request_id) as sp:
            try:
                route = self._router.route(job.prompt_token_ids)
            except NoDecodeWorker:
                # Workers may have come up (or back) since the last health round: check now, once.
                await self._pool.check_all()
                try:
                    route = self._router.route(job.prompt_token_ids)
                except NoDecodeWorker as e:
                    raise Unavailable(str(e)) from None
            annotate(
                sp,
                decode_worker=route.decode.address,
                prefill_worker=route.prefill.address if route.prefill is not None else None,
                disaggregated=route.prefill is not None,
                cached_tokens=route.cached_tokens_estimate,
            )
            return route

    async def _stream(self, job: Job, route: Route, timeout_s: float | None) -> AsyncIterator[Piece]:
        text = TextStream(self._tokenizer, job.prompt_token_ids, job.stops)
        request = worker_pb2.DecodeRequest(
            request_id=job.request_id,
            prompt_token_ids=job.prompt_token_ids,
            sampling=job.sampling,
            stopping=job.stopping,
            priority=job.priority,
            prefill_peer=route.prefill.address if route.prefill is not None else "",
        )
        log.debug(
            "route %s: decode=%s prefill=%s",
            job.request_id,
            route.decode.address,
            request.prefill_peer or "local",
        )
        self._router.begin(route)
        call = route.decode.decode_stub().Generate(request, timeout=timeout_s)
        usage = common_pb2.Usage(prompt_tokens=len(job.prompt_token_ids))
        try:
            async for resp in call:
                self._router.prefill_done(route)
                usage.completion_tokens = resp.num_output_tokens
                usage.cached_tokens = resp.num_cached_tokens
                delta, stopped = text.push(resp.token_ids)
                piece = Piece(job.request_id, delta, list(resp.token_ids), list(resp.logprobs))
                if stopped:
                    # the decode worker aborts (and frees the blocks) when its call is cancelled
                    call.cancel()
                    piece.finish_reason, piece.finish_message = FinishReason.FINISH_REASON_STOP, "stop string"
                elif resp.finish_reason != FinishReason.FINISH_REASON_UNSPECIFIED:
                    tail = text.finish()
                    piece.text += tail
                    piece.finish_reason = resp.finish_reason
                    piece.finish_message = "stop string" if text.stopped else self._why(job, resp)
                if piece.finish_reason != FinishReason.FINISH_REASON_UNSPECIFIED:
                    piece.usage = usage
                    yield piece
                    return
                if piece.text or piece.token_ids:
                    yield piece
            raise Unavailable(
                f"decode worker {route.decode.address} ended the stream without a finish reason"
            )
        finally:
            call.cancel()
            self._router.end(route)

    def _why(self, job: Job, resp: worker_pb2.DecodeResponse) -> str:
        if resp.finish_reason != FinishReason.FINISH_REASON_STOP or not resp.token_ids:
            return ""
        last = resp.token_ids[-1]
        if last in job.stopping.stop_token_ids:
            return f"stop token {last}"
        if last in self._tokenizer.eos_token_ids:
            return "eos token"
        return ""
