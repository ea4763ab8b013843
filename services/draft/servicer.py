"""gRPC servicers of the draft service: ProposeRequest -> DraftAsks -> engine -> DraftProposals.

The engine runs on one thread of its own (`run`), one call at a time; the servicer only
converts. Also serves Worker.GetLoad / GetInfo (role "draft"), so that tools and tests read
the draft's KV blocks and sequences the way they read a worker's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.common.convert import sampling_from_pb
from services.common.errors import InvalidArgument
from shared.config import MAX_SPECULATIVE_TOKENS, DraftConfig
from shared.engine.draft import DraftAsk, DraftEngine, DraftResult, probs_to_bytes
from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc, worker_pb2, worker_pb2_grpc
from shared.telemetry import annotate

Run = Callable[..., Awaitable[Any]]  # run(fn, *args): fn(*args) on the engine thread


def sequence_key(client_id: str, sequence_id: str) -> str:
    """One name per (decode worker, sequence); the length prefix keeps any two pairs apart."""
    return f"{len(client_id)}:{client_id}/{sequence_id}"


def ask_from_pb(client_id: str, s: draft_pb2.DraftSequence) -> DraftAsk:
    if not s.token_ids:
        raise InvalidArgument("token_ids", f"sequence {s.sequence_id!r} has no tokens")
    if not 1 <= s.num_proposals <= MAX_SPECULATIVE_TOKENS:
        raise InvalidArgument(
            "num_proposals", f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {s.num_proposals}"
        )
    params = None
    if s.HasField("sampling"):
        params = sampling_from_pb(s.sampling)
        params.validate()
    return DraftAsk(
        sequence_key(client_id, s.sequence_id), s.num_kept_tokens, list(s.token_ids), s.num_proposals, params
    )


def proposal_to_pb(sequence_id: str, r: DraftResult) -> draft_pb2.DraftProposal:
    return draft_pb2.DraftProposal(
        sequence_id=sequence_id,
        unknown_sequence=r.unknown,
        token_ids=r.token_ids,
        probs=probs_to_bytes(r.probs) if r.probs is not None else b"",
    )


class DraftServicer(draft_pb2_grpc.DraftServicer):
    def __init__(self, engine: DraftEngine, run: Run, on_change: Callable[[], None]):
        self._engine = engine
        self._run = run
        self._on_change = on_change  # refreshes the gauges
        self.num_calls = 0
        self.num_proposed = 0

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        asks = [ask_from_pb(request.client_id, s) for s in request.sequences]
        released = [sequence_key(request.client_id, sid) for sid in request.released_ids]

        def step(engine: DraftEngine) -> list[DraftResult]:
            engine.release(released)
            return engine.propose(asks)

        results = await self._run(step, self._engine)
        self._on_change()
        self.num_calls += 1
        self.num_proposed += sum(len(r.token_ids) for r in results)
        annotate(
            sequences=len(asks),
            released=len(released),
            spec_proposed=sum(len(r.token_ids) for r in results),
            unknown_sequences=sum(r.unknown for r in results),
        )
        return draft_pb2.ProposeResponse(
            proposals=[
                proposal_to_pb(s.sequence_id, r) for s, r in zip(request.sequences, results, strict=True)
            ],
            vocab_size=self._engine.vocab_size,
        )

    async def Release(self, request: draft_pb2.ReleaseRequest, context) -> draft_pb2.ReleaseResponse:
        keys = [sequence_key(request.client_id, sid) for sid in request.sequence_ids]
        n = await self._run(DraftEngine.release, self._engine, keys)
        self._on_change()
        return draft_pb2.ReleaseResponse(num_released=n)


class DraftWorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Worker.GetLoad / GetInfo for the draft: KV blocks, and sequences held as `num_running`."""

    def __init__(self, engine: DraftEngine, config: DraftConfig, model_name: str):
        self._engine = engine
        self._config = config
        self._model_name = model_name

    async def GetLoad(self, request, context) -> worker_pb2.WorkerLoad:
        s = self._engine.stats()  # plain ints read across threads: a snapshot, no lock needed
        return worker_pb2.WorkerLoad(
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            num_running=s.num_sequences,
        )

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        engine = self._engine
        mc = engine.model_config
        return worker_pb2.WorkerInfo(
            role="draft",
            model_name=self._model_name,
            max_model_len=engine.max_model_len,
            vocab_size=mc.vocab_size,
            block_size=engine.config.block_size,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=self._config.dtype,
            device=self._config.device,
            engine="torch",
            eos_token_ids=mc.eos_token_ids,
        )
