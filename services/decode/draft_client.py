"""The decode worker's proposers for speculative decoding: a draft model, or n-gram lookup.

`DraftProposer` is the engine's Proposer over gRPC. The engine calls `propose(batch)` on its
own thread once per step: a call on a synchronous channel, bounded by a short deadline
(TANDEM_DRAFT_TIMEOUT_S). When a step ends and the next one's batch is known, the engine calls
`prefetch(batch)` first: the call goes out at once, the draft computes while the worker sends
the step's tokens on, and the next `propose` of that batch only waits for the answer. With
TANDEM_DRAFT_MODEL the draft model runs in this process instead (`InProcessDraft`): the same
calls and delta protocol, answered on the engine thread, with no round trip and no other
process to wait for. Whatever goes wrong (deadline,
draft down, a bad answer), the step gets no proposals and decodes as usual; the draft is then left alone for
TANDEM_DRAFT_RETRY_S, so a dead draft costs nothing per step, and tried again after that.
The client's output never depends on it: verification keeps greedy outputs exact and sampled
ones distributed as without speculation.

The delta protocol (only the tokens after the prefix the draft's copy still shares with the
sequence; releases; whole lists after "unknown sequence") is shared/draft_delta.py's; ended
sequences are released with the next call, or at once when none is left.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.common.convert import sampling_to_pb
from services.common.draft_calls import InProcessDraft
from services.common.draft_stream import StreamDraftStub, StreamError
from services.common.server import CHANNEL_OPTIONS
from services.common.tls import PLAINTEXT, Tls
from shared.config import ConfigError, WorkerConfig
from shared.draft_delta import DeltaTracker
from shared.engine.draft import DraftEngine, probs_from_bytes
from shared.engine.spec import NgramProposer, Proposal, ProposalRequest, Proposer
from shared.params import RequestOutput
from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc, worker_pb2, worker_pb2_grpc
from shared.telemetry import Telemetry, annotate, inject_context
from shared.telemetry.attributes import REQUEST_ID, RPC_GRPC_STATUS_CODE
from shared.telemetry.tracing import start_span

log = logging.getLogger(__name__)

MAX_LOGGED_IDS = 32  # request ids put on one span
# Draft ahead for at most this many sequences: the draft's work per call grows k + 1 times, and
# the step it hides behind (the target's verification) grows far less with the batch.
MAX_AHEAD_BATCH = 4


def build_proposer(
    config: WorkerConfig, vocab_size: int, telemetry: Telemetry, tls: Tls = PLAINTEXT
) -> Proposer | None:
    """The proposer the configuration asks for (None: no speculation)."""
    kind = config.speculation
    if kind == "ngram":
        return NgramProposer()
    if kind == "draft":
        local = None
        if config.draft_model:
            local = InProcessDraft(build_draft_engine(config))
            log.info("draft model %s runs in this worker (%s)", config.draft_model, config.device)
        return DraftProposer(
            config.draft_addr,
            local=local,
            vocab_size=vocab_size,
            timeout_s=config.draft_timeout_s,
            retry_s=config.draft_retry_s,
            telemetry=telemetry,
            tls=tls,
            ahead=config.draft_ahead and local is None,
            transport=config.draft_transport,
        )
    return None


def build_draft_engine(config: WorkerConfig) -> DraftEngine:
    """The draft model of TANDEM_DRAFT_MODEL, in this process; a bad model is a ConfigError."""
    from shared.engine import EngineConfig, KVCacheTooSmall, ModelLoadError

    try:
        return DraftEngine(EngineConfig(**config.draft_engine_kwargs()))
    except (ModelLoadError, FileNotFoundError) as e:
        raise ConfigError(f"TANDEM_DRAFT_MODEL: {e}") from None
    except KVCacheTooSmall as e:
        raise ConfigError(f"TANDEM_DRAFT_KV_CACHE_MEMORY: {e}") from None


@dataclass
class _Call:
    """A Propose or ProposeAhead call sent and not yet collected."""

    batch: list[ProposalRequest]
    lengths: list[int]  # each sequence's token count when sent
    released: list[str]  # the releases it carries
    span: trace.Span
    answer: Callable[[], draft_pb2.ProposeResponse]  # waits for the response (raises what failed the call)
    cancel: Callable[[], object]
    # ProposeAhead: waits for the second response, the branches (after `answer`)
    branches: Callable[[], draft_pb2.ProposeResponse] | None = None
    # request id -> its proposals, known at sending from a branch of the previous call
    foreseen: dict[str, list[int]] = field(default_factory=dict)
    started: float = 0.0
    proposals: dict[str, Proposal] | None = None  # the answer, once taken in
    timed: bool = False  # a ProposeAhead call's wait went into the histogram

    @property
    def all_foreseen(self) -> bool:
        return len(self.foreseen) == len(self.batch)

    def serves(self, batch: list[ProposalRequest]) -> bool:
        """Its answer is this batch's: the same sequences, at the same lengths, asking as many."""
        return len(batch) == len(self.batch) and all(
            a.request_id == b.request_id and len(a.token_ids) == n and a.num_tokens == b.num_tokens
            for a, b, n in zip(batch, self.batch, self.lengths, strict=True)
        )


class DraftProposer:
    """A Proposer backed by a draft model: the draft service at `address`, or `local`, a draft
    engine in this process answering the same calls without a network hop. Used from the
    engine thread only (`close` aside)."""

    def __init__(
        self,
        address: str,
        *,
        local: InProcessDraft | None = None,
        vocab_size: int,
        timeout_s: float,
        retry_s: float,
        telemetry: Telemetry,
        clock: Callable[[], float] = time.monotonic,
        tls: Tls = PLAINTEXT,
        ahead: bool = False,
        transport: str = "stream",
    ):
        self.address = local.address if local is not None else address
        self.client_id = uuid.uuid4().hex[:16]  # this process's sequences, to the draft
        self._vocab_size = vocab_size
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._telemetry = telemetry
        self._clock = clock
        # reconnect soon after the draft comes back (gRPC's default backoff grows to minutes)
        backoff_ms = max(100, int(retry_s * 1000))
        options = [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        self._channel = tls.channel(address, options=options) if local is None else None
        self.local = local
        self._stub = draft_pb2_grpc.DraftStub(self._channel) if local is None else local
        self._delta = DeltaTracker()
        self._pending: _Call | None = None  # a prefetched call not yet collected
        self._ahead = ahead and local is None  # ProposeAhead: nothing to gain in this process
        # Propose and Release over the draft's stream transport (services/common/draft_stream.py)
        # when it offers one: asked through GetInfo at the first call and after each failure
        self._use_stream = transport == "stream" and local is None and not tls.enabled
        self._stream: StreamDraftStub | None = None
        self._stream_asked = False
        self._last: _Call | None = None  # the call whose proposals are verified now, branches unread
        self._retry_at = 0.0
        self._failing = False
        self.num_calls = 0
        self.num_failures = 0
        self.num_unused = 0  # prefetched calls whose step asked for another batch
        self.num_foreseen = 0  # steps that took every proposal from a branch, without waiting

    @property
    def transport(self) -> str:
        """How the last calls went: "in-process", "stream" (the draft's stream transport) or "grpc"."""
        if self.local is not None:
            return "in-process"
        return "stream" if self._stream is not None and not self._ahead else "grpc"

    # -- Proposer -----------------------------------------------------------------------
    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        pending, self._pending = self._pending, None
        if self._clock() < self._retry_at:
            for call in (pending, self._last):  # sent before a failure: left to the draft's idle timeout
                if call is not None:
                    self._abandon(call)
            self._last = None
            return {}
        try:
            if pending is not None:
                if pending.serves(batch):
                    return self._take(pending)
                self._finish(pending)  # answered or not, the draft's copies moved with it
                self.num_unused += 1
            return self._take(self._send(batch))
        except Exception as e:  # noqa: BLE001 - the engine thread must never fail for the draft
            self._failed(e)
            return {}

    def prefetch(self, batch: list[ProposalRequest]) -> None:
        """Send the next step's call now (the engine's guess of its batch, after a step); `propose`
        takes its answer if the step asks for that batch, or sends another. A draft in this
        process gains nothing from it: it would compute on the engine's thread all the same."""
        if self.local is not None or self._clock() < self._retry_at:
            return
        self._settle()
        try:
            self._pending = self._send(batch, prefetched=True)
        except Exception as e:  # noqa: BLE001
            self._failed(e)

    def release(self, request_id: str) -> None:
        self._delta.release(request_id)
        released = self._delta.releases
        if not self._delta.tracked() and released and self._clock() >= self._retry_at:
            # nothing left to speculate on: no next call would carry the releases. A call still
            # out may name the sequence: let the draft answer it first.
            self._settle()
            try:
                self._read_branches()
                self._unary_stub().Release(
                    draft_pb2.ReleaseRequest(client_id=self.client_id, sequence_ids=released),
                    timeout=self._timeout_s,
                    metadata=inject_context(),
                )
                self._delta.releases_delivered(released)
            except Exception as e:  # noqa: BLE001
                self._failed(e)  # the draft frees them after its idle timeout anyway

    def close(self) -> None:
        """From another thread than the engine's, at shutdown: cancels a prefetched call still
        out (the engine thread, should it step again, collects it as failed) and the channel."""
        for call in (self._pending, self._last):
            if call is not None:
                call.cancel()
        if self._stream is not None:
            self._stream.close()
        if self._channel is not None:
            self._channel.close()

    def _unary_stub(self):
        """Where Propose and Release go: the draft's stream when it serves one (and no call
        drafts ahead: ProposeAhead is gRPC's), else the gRPC stub (or the draft in this process)."""
        if not self._use_stream or self._ahead:
            return self._stub
        if not self._stream_asked:
            info = worker_pb2_grpc.WorkerStub(self._channel).GetInfo(
                worker_pb2.GetInfoRequest(), timeout=self._timeout_s
            )
            self._stream_asked = True
            if info.stream_port:
                host = self.address.rpartition(":")[0].strip("[]")
                stream = StreamDraftStub(host, info.stream_port, connect_timeout_s=self._timeout_s)
                try:
                    stream.connect()
                    self._stream = stream
                    log.info("draft service %s: calling it on its stream transport, %s", self.address, stream.address)
                except StreamError as e:  # e.g. a port the network does not route: gRPC will do
                    log.warning("draft service %s: its stream transport %s is unreachable (%s): calling over gRPC",
                                self.address, stream.address, e.details())
        return self._stream or self._stub

    # -- the call -----------------------------------------------------------------------
    def _send(self, batch: list[ProposalRequest], prefetched: bool = False) -> _Call:
        branches = self._read_branches()
        may_ahead = self._ahead and len(batch) <= MAX_AHEAD_BATCH
        entries, accepted, foreseen = [], 0, {}
        for req in batch:
            entry, prev_accepted = self._entry(req)
            entries.append(entry)
            accepted += prev_accepted
            if entry.HasField("sampling"):
                continue  # greedy sequences only
            if may_ahead:
                entry.num_ahead = max(req.max_tokens, req.num_tokens)
            # the step's outcome is one the draft drafted ahead: it answers with that branch
            if len(entry.token_ids) == 1 and entry.num_kept_tokens:
                drafted = branches.get(req.request_id, {}).get((entry.num_kept_tokens, entry.token_ids[0]))
                if drafted is not None and req.num_tokens <= len(drafted):
                    foreseen[req.request_id] = drafted[: req.num_tokens]

        released = self._delta.releases
        request = draft_pb2.ProposeRequest(client_id=self.client_id, sequences=entries, released_ids=released)
        ids = [r.request_id for r in batch]
        self._delta.sent(ids)
        for req in batch:  # the draft's copy, once it adopts the branch (its answer confirms it)
            if req.request_id in foreseen:
                self._delta.answered(req.request_id, req.token_ids, foreseen[req.request_id])
        ahead = any(e.num_ahead for e in entries)
        # One call serves every speculating request: its span is a child of the oldest one's
        # (the batch is in arrival order) and links to each request's span.
        spans = [(rid, self._telemetry.request_spans.get(rid)) for rid in ids[:MAX_LOGGED_IDS]]
        spans = [(rid, sc) for rid, sc in spans if sc is not None]
        span = start_span(
            "draft propose",
            tracer=self._telemetry.tracer,
            kind=SpanKind.CLIENT,
            parent=spans[0][1] if spans else None,
            links=[Link(sc, {REQUEST_ID: rid}) for rid, sc in spans],
            draft=self.address,
            sequences=len(batch),
            request_ids=",".join(ids[:MAX_LOGGED_IDS]),
            # verification results arrive with the next call: these are the previous call's
            spec_accepted=accepted,
            prefetched=prefetched,
            foreseen=len(foreseen),
        )
        self.num_calls += 1
        metadata = inject_context(trace.set_span_in_context(span))
        started = time.perf_counter()
        observe = self._telemetry.metrics.spec_draft_call_seconds.observe
        branches_of = None
        try:
            if self.local is not None:  # answered here and now
                response = self.local.Propose(request)
                observe(time.perf_counter() - started)
                answer, cancel = (lambda: response), (lambda: None)
            elif ahead:  # two responses on one stream: the proposals, then the branches
                stream = self._stub.ProposeAhead(request, timeout=self._timeout_s, metadata=metadata)
                answer = branches_of = lambda: next(stream)
                cancel = stream.cancel
            else:
                stub = self._unary_stub()
                annotate(span, transport=self.transport)
                future = stub.Propose.future(request, timeout=self._timeout_s, metadata=metadata)
                future.add_done_callback(
                    lambda f: f.cancelled() or f.exception() is not None or observe(time.perf_counter() - started)
                )
                answer, cancel = future.result, future.cancel
        except Exception as e:
            self._forget(foreseen)
            _end_failed(span, e)
            raise
        return _Call(batch, [len(r.token_ids) for r in batch], released, span, answer, cancel, branches_of,
                     foreseen, started)

    def _take(self, call: _Call) -> dict[str, Proposal]:
        """The proposals of the call this step verifies: known already when a branch foresaw
        every sequence's, else its answer. Its branches are read when the next call goes out."""
        if call.all_foreseen:
            self.num_foreseen += 1
            self._telemetry.metrics.spec_draft_foreseen.inc()
            self._time(call, 0.0)  # the step waited for nothing
            out = {}
            for req in call.batch:
                proposal = self._proposal(req, call.foreseen[req.request_id], b"", self._vocab_size)
                if proposal is not None:
                    out[req.request_id] = proposal
        else:
            out = self._answer(call)
        if call.branches is not None:
            self._last = call
        return out

    def _answer(self, call: _Call) -> dict[str, Proposal]:
        """Waits for a call's answer (once) and takes it into the delta bookkeeping: its
        proposals by request id, none for a sequence released since it was sent. Ends the span
        of a call with no branches to come."""
        if call.proposals is not None:
            return call.proposals
        span = call.span
        try:
            response = call.answer()
            self._time(call, time.perf_counter() - call.started)
            span.set_attribute(RPC_GRPC_STATUS_CODE, grpc.StatusCode.OK.value[0])
            self._delta.releases_delivered(call.released)
            if self._failing:
                log.info("draft service %s answers again: speculating", self.address)
                self._failing = False
            out: dict[str, Proposal] = {}
            for req, prop in zip(call.batch, response.proposals, strict=True):
                if not self._delta.tracks(req.request_id):
                    continue  # ended while the call was out: released with the next one
                if prop.unknown_sequence:
                    self._delta.unknown(req.request_id)  # whole list next step
                    continue
                tokens = list(prop.token_ids)
                self._delta.answered(req.request_id, req.token_ids, tokens)
                proposal = self._proposal(req, tokens, prop.probs, response.vocab_size)
                if proposal is not None:
                    out[req.request_id] = proposal
            annotate(span, spec_proposed=sum(len(p.token_ids) for p in out.values()))
        except Exception as e:
            self._forget(call.foreseen)
            _end_failed(span, e)
            raise
        call.proposals = out
        if call.branches is None:
            span.end()
        return out

    def _time(self, call: _Call, seconds: float) -> None:
        """Times a ProposeAhead call once, as its step waited for it (a Propose call times itself)."""
        if call.branches is not None and not call.timed:
            call.timed = True
            self._telemetry.metrics.spec_draft_call_seconds.observe(seconds)

    def _read_branches(self) -> dict[str, dict[tuple[int, int], list[int]]]:
        """The branches of the call verified last (ProposeAhead's second response): request id ->
        (num_kept, token) -> proposals; none if that call had none. Raises what failed it."""
        call, self._last = self._last, None
        return {} if call is None else self._finish(call)

    def _finish(self, call: _Call) -> dict[str, dict[tuple[int, int], list[int]]]:
        """Takes a call's answer in, then its branches (if it has any), and ends its span."""
        self._answer(call)
        if call.branches is None:
            return {}
        try:
            response = call.branches()
        except Exception as e:
            self._forget(call.foreseen)
            _end_failed(call.span, e)
            raise
        out = {
            prop.sequence_id: {(b.num_kept_tokens, b.token_id): list(b.token_ids) for b in prop.branches}
            for prop in response.proposals
            if prop.branches and self._delta.tracks(prop.sequence_id)
        }
        annotate(call.span, spec_branches=sum(len(b) for b in out.values()))
        call.span.end()
        return out

    def _abandon(self, call: _Call) -> None:
        """Drops a call without its answer (the draft may have taken it or not)."""
        call.cancel()
        self._forget(call.foreseen)
        call.span.end()

    def _forget(self, foreseen: dict[str, list[int]]) -> None:
        """The bookkeeping took these sequences' branches as the draft's copies on sending; the
        call failed, so whether the draft adopted them is unknown: send them whole next time."""
        for request_id in foreseen:
            self._delta.unknown(request_id)

    def _settle(self) -> None:
        """Collects a prefetched call nobody took, so that the bookkeeping follows the draft."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.num_unused += 1
            try:
                self._finish(pending)
            except Exception as e:  # noqa: BLE001
                self._failed(e)

    def _entry(self, req: ProposalRequest) -> tuple[draft_pb2.DraftSequence, int]:
        """The delta for one sequence, and how many of the previous proposals it accepted."""
        delta = self._delta.delta(req.request_id, req.token_ids)
        entry = draft_pb2.DraftSequence(
            sequence_id=req.request_id,
            num_kept_tokens=delta.num_kept,
            token_ids=delta.token_ids,
            num_proposals=req.num_tokens,
        )
        if not (req.params.greedy and req.params.repetition_penalty == 1.0 and not req.params.logit_bias):
            entry.sampling.CopyFrom(sampling_to_pb(req.params))
        return entry, delta.num_accepted

    def _proposal(
        self, req: ProposalRequest, tokens: list[int], probs: bytes, draft_vocab: int
    ) -> Proposal | None:
        if not tokens or any(t >= self._vocab_size for t in tokens):
            return None
        num_rows = len(tokens)
        tokens = tokens[: req.num_tokens]
        if req.params.greedy:
            return Proposal(tokens)
        # rejection sampling needs q, the draft's distribution, over the target's vocabulary
        if not probs or draft_vocab > self._vocab_size:
            return None
        q = probs_from_bytes(probs, num_rows)
        if q.shape[1] != draft_vocab:
            return None
        if draft_vocab < self._vocab_size:  # a smaller draft vocabulary: q is 0 on the rest
            q = torch.nn.functional.pad(q, (0, self._vocab_size - draft_vocab))
        return Proposal(tokens, q[: len(tokens)])

    def _failed(self, e: Exception) -> None:
        if self._ahead and isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.UNIMPLEMENTED:
            # a draft service from before ProposeAhead: plain Propose calls from now on
            self._ahead = False
            log.warning("draft service %s does not serve ProposeAhead: drafting without it", self.address)
            return
        self.num_failures += 1
        self._retry_at = self._clock() + self._retry_s
        if self._stream is not None:  # it may have restarted on another port: ask again
            self._stream.close()
            self._stream = None
        self._stream_asked = False
        if not self._failing:
            what = e.code().name if isinstance(e, grpc.Call) else f"{type(e).__name__}: {e}"
            log.warning(
                "draft service %s failed (%s): decoding without drafts, trying again every %.1f s",
                self.address,
                what,
                self._retry_s,
            )
            self._failing = True


def _end_failed(span: trace.Span, e: Exception) -> None:
    """Ends a draft call's span with the error that ended the call."""
    if isinstance(e, grpc.Call):
        span.set_attribute(RPC_GRPC_STATUS_CODE, e.code().value[0])
    span.record_exception(e)
    span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
    span.end()


class SpecTally:
    """Feeds one request's cumulative speculation counts to the Prometheus counters, as deltas."""

    def __init__(self, metrics) -> None:
        self._metrics = metrics
        self._proposed = self._accepted = 0

    def observe(self, out: RequestOutput) -> None:
        if out.num_spec_proposed > self._proposed:
            self._metrics.record_speculation(
                out.num_spec_proposed - self._proposed, out.num_spec_accepted - self._accepted
            )
            self._proposed, self._accepted = out.num_spec_proposed, out.num_spec_accepted


def spec_attributes(out: RequestOutput) -> dict[str, int]:
    """The request's speculation counts for its decode span (none without speculation)."""
    if not out.num_spec_steps:
        return {}
    return dict(
        spec_proposed=out.num_spec_proposed,
        spec_accepted=out.num_spec_accepted,
        spec_steps=out.num_spec_steps,
    )
