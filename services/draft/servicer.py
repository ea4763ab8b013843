"""gRPC servicers of the draft service: ProposeRequest -> DraftAsks -> engine -> DraftProposals.

The engine runs on the event loop's thread (see app.py), one call at a time, through the functions
of services/common/draft_calls.py (a decode worker with its draft in-process calls the same
ones); the servicer adds the gauges and the span's attributes. Also serves Worker.GetLoad /
GetInfo (role "draft"), so that tools and tests read the draft's KV blocks and sequences the
way they read a worker's.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common import draft_calls
from shared.config import DraftConfig
from shared.engine.draft import DraftEngine
from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc, worker_pb2, worker_pb2_grpc
from shared.telemetry import annotate


class DraftServicer(draft_pb2_grpc.DraftServicer):
    def __init__(self, engine: DraftEngine, on_change: Callable[[], None]):
        self._engine = engine
        self._on_change = on_change  # refreshes the gauges
        self.num_calls = 0
        self.num_proposed = 0

    async def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        response = draft_calls.propose(self._engine, request)
        self._on_change()
        proposed = sum(len(p.token_ids) for p in response.proposals)
        self.num_calls += 1
        self.num_proposed += proposed
        annotate(
            sequences=len(request.sequences),
            released=len(request.released_ids),
            spec_proposed=proposed,
            unknown_sequences=sum(p.unknown_sequence for p in response.proposals),
        )
        return response

    async def ProposeAhead(self, request: draft_pb2.ProposeRequest, context):
        """Propose's answer at once; the branches once drafted, while the caller verifies."""
        yield await self.Propose(request, context)
        response = draft_calls.draft_ahead(self._engine, request)
        self._on_change()
        annotate(spec_branches=sum(len(p.branches) for p in response.proposals))
        yield response

    async def Release(self, request: draft_pb2.ReleaseRequest, context) -> draft_pb2.ReleaseResponse:
        response = draft_calls.release(self._engine, request)
        self._on_change()
        return response


class DraftWorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Worker.GetLoad / GetInfo for the draft: KV blocks, and sequences held as `num_running`."""

    def __init__(self, engine: DraftEngine, config: DraftConfig, model_name: str):
        self._engine = engine
        self._config = config
        self._model_name = model_name
        self.stream_port = 0  # the stream transport's, once it listens (app.py)

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
            stream_port=self.stream_port,
        )
