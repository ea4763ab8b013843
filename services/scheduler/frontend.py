"""One request's life in the scheduler: validate, tokenize, admit, relay, measure.

The scheduler validates the request itself (prompt text or ids, stop strings, the request id,
and the engine's rules for the prompt, the sampling parameters and the model length, see
validation.py), so that a bad request is refused before it could wait in the admission queue.
A long text prompt is tokenized in a worker process (tokenizing.py), so one huge prompt never
stalls the event loop, and with it every other request; a text too large to fit the model
length is refused before it is tokenized. A valid one
waits for a running slot (admission.py: bounded by requests and by tokens, highest priority
first; past the bounds RESOURCE_EXHAUSTED at once), then the relay (relay.py) streams its
tokens from a decode worker, moving it to another one if its worker fails mid-stream. The
client's deadline bounds all of it: queueing, and every call downstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from services.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from shared.pb.tandem.v1 import common_pb2, generate_pb2
from shared.telemetry import Telemetry, annotate, bind_request_id, get_logger
from shared.text import Tokenizer

from .admission import AdmissionQueue
from .pool import WorkerPool
from .relay import Job, Piece, Relay
from .router import Router
from .tokenizing import PromptEncoder
from .validation import check_options, check_prompt_ids, check_text_size

__all__ = ["Frontend", "Job", "Piece"]

log = logging.getLogger(__name__)
access_log = get_logger("tandem.access")  # one structured line per finished request

MAX_REQUEST_ID_LEN = 128


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
        max_inflight_per_decode: int = 64,
        max_queued_requests: int = 256,
        max_queued_tokens: int = 1 << 20,
        max_migrations: int = 2,
    ):
        self._tokenizer = tokenizer
        self._pool = pool
        self._telemetry = telemetry
        self._default_max_tokens = default_max_tokens
        self._max_stop_strings = max_stop_strings
        self._active: set[str] = set()
        self._encoder = PromptEncoder(tokenizer)
        self.relay = Relay(tokenizer, pool, router, telemetry, max_migrations=max_migrations)
        self.admission = AdmissionQueue(
            lambda: max_inflight_per_decode * max(1, len(pool.healthy("decode"))),
            max_queued_requests=max_queued_requests,
            max_queued_tokens=max_queued_tokens,
            on_wait=telemetry.metrics.queue_time_seconds.observe,
        )
        pool.on_healthy.append(lambda worker: self.admission.poke())
        telemetry.metrics.queue_depth.set_function(lambda: self.admission.num_queued)
        telemetry.metrics.running_sequences.set_function(lambda: self.admission.num_running)

    # -- validation ---------------------------------------------------------------------
    async def prepare(self, req: generate_pb2.GenerateRequest) -> Job:
        """Validate and tokenize; raises InvalidArgument naming the field (and logs the refusal)."""
        try:
            return await self._prepare(req)
        except InvalidArgument as e:
            access_log.info(
                "request rejected",
                code="INVALID_ARGUMENT",
                reason=str(e)[:500],
                request_id=req.request_id[:128] or None,
            )
            raise

    async def _prepare(self, req: generate_pb2.GenerateRequest) -> Job:
        kind = req.WhichOneof("prompt")
        if kind is None:
            raise InvalidArgument("prompt", "set either text or token_ids")
        vocab_size = self._tokenizer.vocab_size
        max_model_len = self._pool.max_model_len()
        if kind == "text":
            prompt = await self.encode(req.text)
        else:
            prompt = list(req.token_ids.ids)
        check_prompt_ids(prompt, vocab_size, max_model_len, field=kind)
        stopping, stops = check_options(
            req,
            len(prompt),
            vocab_size=vocab_size,
            max_model_len=max_model_len,
            default_max_tokens=self._default_max_tokens,
            max_stop_strings=self._max_stop_strings,
        )
        request_id = req.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_LEN or not all(" " <= ch <= "~" for ch in request_id):
            # it travels in gRPC metadata (x-request-id), which takes printable ASCII only
            raise InvalidArgument(
                "request_id", f"must be at most {MAX_REQUEST_ID_LEN} printable ASCII characters"
            )
        if request_id in self._active:
            raise InvalidArgument("request_id", f"{request_id!r} is already running")
        return Job(request_id, prompt, req.sampling, stopping, stops, req.priority)

    async def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt text (InvalidArgument "text" when empty or too large to fit the
        model length, checked before tokenizing); a long text is tokenized off the event loop.
        For every front door: the HTTP API's rendered chat templates come through here too."""
        check_text_size(text, self._pool.max_model_len(), self._tokenizer.max_token_bytes)
        return await self._encoder.encode(text, add_special_tokens)

    def close(self) -> None:
        self._encoder.close()

    # -- streaming ----------------------------------------------------------------------
    async def generate(self, job: Job, timeout_s: float | None = None) -> AsyncIterator[Piece]:
        """Admit the job, then stream its pieces; the last one has finish_reason and usage.
        `timeout_s`: what is left of the client's deadline (None: no deadline)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
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
                # a client that cancels or whose deadline passes while queued leaves the queue
                try:
                    await self.admission.acquire(job.priority, job.num_tokens)
                except ResourceExhausted as e:
                    access_log.info("request rejected", code="RESOURCE_EXHAUSTED", reason=str(e))
                    raise
                except asyncio.CancelledError:
                    access_log.info("request cancelled", phase="queued", seconds=_since(start))
                    raise
                try:
                    annotate(sp, queue_seconds=time.perf_counter() - start)
                    async for piece in self.relay.run(job, deadline):
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
                            finish = dict(
                                prompt_tokens=piece.usage.prompt_tokens,
                                completion_tokens=piece.usage.completion_tokens,
                                cached_tokens=piece.usage.cached_tokens,
                                spec_proposed=piece.usage.spec_proposed_tokens,
                                spec_accepted=piece.usage.spec_accepted_tokens,
                                finish_reason=common_pb2.FinishReason.Name(piece.finish_reason),
                            )
                            annotate(sp, **finish)
                            access_log.info("request finished", **finish, seconds=round(now - start, 4))
                        yield piece
                except (asyncio.CancelledError, GeneratorExit):
                    # the client cancelled or went away (a stop string ends with a finish reason)
                    access_log.info(
                        "request cancelled",
                        phase="running",
                        completion_tokens=num_tokens,
                        seconds=_since(start),
                    )
                    raise
                except DeadlineExceeded as e:
                    access_log.info(
                        "request cancelled", phase="running", reason=str(e), seconds=_since(start)
                    )
                    raise
                finally:
                    self.admission.release()
        finally:
            self._active.discard(job.request_id)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 4)
