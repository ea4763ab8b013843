"""One admitted request's token stream, relayed from decode workers to the client.

The relay routes the request, calls Decode.Generate with what is left of the client's
deadline, detokenizes the tokens (`shared.text.TextStream`) and cuts at stop strings (a hit
cancels the downstream call, so the decode worker aborts the request and frees its blocks).

When the decode worker fails (UNAVAILABLE: it died, its connection broke, or it stopped and
its grace period ran out; also CANCELLED/ABORTED coming from the server side):
- before any token reached the client, the request is simply sent to another decode worker;
- after n tokens, it *migrates*: another decode worker gets the prompt plus those n tokens,
  max_tokens - n and seed_offset + n, so the continuation is exactly the one the first
  worker would have produced (greedy, or seeded: the engine draws output i's noise from
  (seed, i)). The client's stream goes on without a repeated or a missing token. At most
  `max_migrations` times; after that, or when no decode worker is left, UNAVAILABLE.
A failed worker is marked unhealthy at once (routing skips it until a health check passes).
So is a prefill worker that the decode worker had to do without (it answers `prefilled_by`
empty for a request routed to a prefill peer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from services.common.errors import DeadlineExceeded, Unavailable
from shared.pb.tandem.v1 import common_pb2, worker_pb2
from shared.telemetry import Telemetry, annotate
from shared.text import TextStream, Tokenizer

from .pool import WorkerPool
from .router import NoDecodeWorker, Route, Router

log = logging.getLogger(__name__)

FinishReason = common_pb2.FinishReason

# Codes of a decode call that mean "this worker is gone", not "this request is wrong". The
# client's own cancel or deadline never shows up as one: it cancels the relay itself.
WORKER_FAILED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED)


@dataclass
class Job:
    """A validated request, ready to route."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParameters
    stopping: common_pb2.StoppingCriteria  # max_tokens always set; stop strings live in `stops`
    stops: list[str]
    priority: int = 0

    @property
    def full_prefill(self) -> bool:
        """It asks for prompt logprobs: its decode worker computes every prompt token itself."""
        return self.sampling.HasField("prompt_logprobs")

    @property
    def num_tokens(self) -> int:
        """The work it brings: prompt + max_tokens (what the admission queue bounds)."""
        return len(self.prompt_token_ids) + self.stopping.max_tokens

    def resumed(self, emitted: list[int], attempt: int) -> Job:
        """This job after `emitted` tokens: they join the prompt; max_tokens and the seed offset move on."""
        sampling = common_pb2.SamplingParameters()
        sampling.CopyFrom(self.sampling)
        sampling.seed_offset = self.sampling.seed_offset + len(emitted)
        sampling.ClearField("prompt_logprobs")  # the first response, which carried them, reached the client
        stopping = common_pb2.StoppingCriteria()
        stopping.CopyFrom(self.stopping)
        stopping.max_tokens = self.stopping.max_tokens - len(emitted)
        # a new id downstream: the failed worker may still be aborting the old one
        return Job(
            f"{self.request_id}~{attempt}",
            self.prompt_token_ids + emitted,
            sampling,
            stopping,
            self.stops,
            self.priority,
        )


@dataclass
class Piece:
    """What the client gets in one response."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)  # passed through from the worker
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)  # on the first piece, when asked
    finish_reason: int = FinishReason.FINISH_REASON_UNSPECIFIED
    finish_message: str = ""
    usage: common_pb2.Usage | None = None


@dataclass
class _Progress:
    """What the client has been sent so far, across attempts."""

    text: TextStream
    usage: common_pb2.Usage
    emitted: list[int] = field(default_factory=list)
    spec: tuple[int, int, int] = (0, 0, 0)  # proposed, accepted, steps of finished attempts


class Relay:
    def __init__(
        self,
        tokenizer: Tokenizer,
        pool: WorkerPool,
        router: Router,
        telemetry: Telemetry,
        *,
        max_migrations: int,
    ):
        self._tokenizer = tokenizer
        self._pool = pool
        self._router = router
        self._telemetry = telemetry
        self._max_migrations = max_migrations
        self.num_migrations = 0  # since start, for tests and logs

    async def run(self, job: Job, deadline: float | None) -> AsyncIterator[Piece]:
        """Pieces of the job's completion; the last one has finish_reason and usage.
        `deadline`: time.monotonic() by which the whole request must be done (None: none)."""
        progress = _Progress(
            TextStream(self._tokenizer, job.prompt_token_ids, job.stops),
            common_pb2.Usage(prompt_tokens=len(job.prompt_token_ids)),
        )
        attempt, migrations, retries, failure = job, 0, 0, ""
        while True:
            route = await self._route(attempt, failure)
            try:
                async for piece in self._stream(job, attempt, route, progress, deadline):
                    yield piece
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in WORKER_FAILED:
                    raise
                failure = f"decode worker {route.decode.address} failed ({e.code().name}: {e.details()})"
                self._pool.mark_failed(route.decode, f"{e.code().name}: {e.details()}")
            n = len(progress.emitted)
            if n == 0:  # nothing reached the client yet: simply try another worker
                retries += 1
                if retries >= len([w for w in self._pool.workers.values() if w.role == "decode"]):
                    raise Unavailable(f"no decode worker answered; last: {failure}")
                continue
            if n >= job.stopping.max_tokens:  # every token arrived, only the finish did not
                yield self._finish(job, progress, FinishReason.FINISH_REASON_LENGTH)
                return
            if migrations >= self._max_migrations:
                raise Unavailable(
                    f"{failure} after {n} tokens, and the request may not move again "
                    f"(moved {migrations} times; TANDEM_MAX_MIGRATIONS={self._max_migrations})"
                )
            migrations += 1
            self.num_migrations += 1
            log.warning("%s after %d tokens: %s resumes elsewhere", failure, n, job.request_id)
            attempt = job.resumed(list(progress.emitted), migrations)

    async def _route(self, job: Job, failure: str) -> Route:
        with self._telemetry.span("route", request_id=job.request_id) as sp:
            try:
                route = self._router.route(job.prompt_token_ids, full_prefill=job.full_prefill)
            except NoDecodeWorker:
                # Workers may have come up (or back) since the last health round: check now, once.
                await self._pool.check_all()
                try:
                    route = self._router.route(job.prompt_token_ids, full_prefill=job.full_prefill)
                except NoDecodeWorker as e:
                    raise Unavailable(f"{failure}; {e}" if failure else str(e)) from None
            annotate(
                sp,
                decode_worker=route.decode.address,
                prefill_worker=route.prefill.address if route.prefill is not None else None,
                disaggregated=route.prefill is not None,
                cached_tokens=route.cached_tokens_estimate,
            )
            return route

    async def _stream(
        self, job: Job, attempt: Job, route: Route, progress: _Progress, deadline: float | None
    ) -> AsyncIterator[Piece]:
        request = worker_pb2.DecodeRequest(
            request_id=attempt.request_id,
            prompt_token_ids=attempt.prompt_token_ids,
            sampling=attempt.sampling,
            stopping=attempt.stopping,
            priority=attempt.priority,
            prefill_peer=route.prefill.address if route.prefill is not None else "",
        )
        log.debug(
            "route %s: decode=%s prefill=%s",
            attempt.request_id,
            route.decode.address,
            request.prefill_peer or "local",
        )
        timeout_s = _remaining(deadline)  # the client's deadline bounds every call downstream
        self._router.begin(route)
        call = route.decode.decode_stub().Generate(request, timeout=timeout_s)
        base = len(progress.emitted)  # tokens of earlier attempts
        usage, text = progress.usage, progress.text
        ended = False  # the worker finished the request: it ends the call itself, with OK
        try:
            async for resp in call:
                if route.prefill_pending and not resp.prefilled_by:
                    # the decode worker could not use its prefill peer and prefilled locally
                    self._pool.mark_failed(route.prefill, "a decode worker prefilled without it")
                self._router.prefill_done(route)
                usage.completion_tokens = base + resp.num_output_tokens
                if attempt is job:
                    usage.cached_tokens = resp.num_cached_tokens
                proposed, accepted, steps = progress.spec
                usage.spec_proposed_tokens = proposed + resp.num_spec_proposed
                usage.spec_accepted_tokens = accepted + resp.num_spec_accepted
                usage.spec_verify_steps = steps + resp.num_spec_steps
                progress.emitted.extend(resp.token_ids)
                delta, stopped = text.push(resp.token_ids)
                piece = Piece(
                    job.request_id, delta, list(resp.token_ids), list(resp.logprobs), list(resp.prompt_logprobs)
                )
                if stopped:
                    # the decode worker aborts (and frees the blocks) when its call is cancelled
                    call.cancel()
                    piece.finish_reason = FinishReason.FINISH_REASON_STOP
                    piece.finish_message = f"stop string {text.stop_string!r}"
                elif resp.finish_reason != FinishReason.FINISH_REASON_UNSPECIFIED:
                    ended = True
                    piece.text += text.finish()
                    piece.finish_reason = resp.finish_reason
                    piece.finish_message = (
                        f"stop string {text.stop_string!r}" if text.stopped else self._why(job, resp)
                    )
                if piece.finish_reason != FinishReason.FINISH_REASON_UNSPECIFIED:
                    piece.usage = _with_mean_accepted(usage)
                    yield piece
                    return
                if piece.text or piece.token_ids or piece.prompt_logprobs:
                    yield piece
            raise Unavailable(
                f"decode worker {route.decode.address} ended the stream without a finish reason"
            )
        finally:
            if not ended:  # cancelling a call that ends by itself would trace it as CANCELLED
                call.cancel()
            self._router.end(route)
            progress.spec = (usage.spec_proposed_tokens, usage.spec_accepted_tokens, usage.spec_verify_steps)

    def _finish(self, job: Job, progress: _Progress, reason: int) -> Piece:
        piece = Piece(job.request_id, progress.text.finish(), [], finish_reason=reason)
        piece.usage = _with_mean_accepted(progress.usage)
        return piece

    def _why(self, job: Job, resp: worker_pb2.DecodeResponse) -> str:
        if resp.finish_reason != FinishReason.FINISH_REASON_STOP or not resp.token_ids:
            return ""
        last = resp.token_ids[-1]
        if last in job.stopping.stop_token_ids:
            return f"stop token {last}"
        if last in self._tokenizer.eos_token_ids:
            return "eos token"
        return ""


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the deadline passed before the request reached a decode worker")
    return left


def _with_mean_accepted(usage: common_pb2.Usage) -> common_pb2.Usage:
    if usage.spec_verify_steps:
        usage.spec_mean_accepted_length = usage.spec_accepted_tokens / usage.spec_verify_steps
    return usage
