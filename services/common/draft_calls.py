"""The Draft service's two calls, answered by a DraftEngine: the draft service's servicer runs
them on its engine thread, and a decode worker with its draft model in-process
(TANDEM_DRAFT_MODEL) calls them directly through `InProcessDraft`, in place of a gRPC stub, so
that both speak the same delta protocol (shared/draft_delta.py) with the same checks."""

from __future__ import annotations

from services.common.convert import sampling_from_pb
from services.common.errors import InvalidArgument
from shared.config import MAX_SPECULATIVE_TOKENS
from shared.engine.draft import DraftAsk, DraftEngine, DraftResult, probs_to_bytes
from shared.pb.tandem.v1 import draft_pb2


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
    if s.num_ahead > MAX_SPECULATIVE_TOKENS:
        raise InvalidArgument("num_ahead", f"must be in [0, {MAX_SPECULATIVE_TOKENS}], got {s.num_ahead}")
    params = None
    if s.HasField("sampling"):
        params = sampling_from_pb(s.sampling)
        params.validate()
    return DraftAsk(
        sequence_key(client_id, s.sequence_id),
        s.num_kept_tokens,
        list(s.token_ids),
        s.num_proposals,
        params,
        ahead=s.num_ahead > 0,
    )


def proposal_to_pb(sequence_id: str, r: DraftResult) -> draft_pb2.DraftProposal:
    return draft_pb2.DraftProposal(
        sequence_id=sequence_id,
        unknown_sequence=r.unknown,
        token_ids=r.token_ids,
        probs=probs_to_bytes(r.probs) if r.probs is not None else b"",
    )


def propose(engine: DraftEngine, request: draft_pb2.ProposeRequest) -> draft_pb2.ProposeResponse:
    """Frees the released sequences, applies each sequence's delta and proposes (on the engine's thread)."""
    asks = [ask_from_pb(request.client_id, s) for s in request.sequences]
    engine.release([sequence_key(request.client_id, sid) for sid in request.released_ids])
    results = engine.propose(asks)
    return draft_pb2.ProposeResponse(
        proposals=[proposal_to_pb(s.sequence_id, r) for s, r in zip(request.sequences, results, strict=True)],
        vocab_size=engine.vocab_size,
    )


def draft_ahead(engine: DraftEngine, request: draft_pb2.ProposeRequest) -> draft_pb2.ProposeResponse:
    """ProposeAhead's second answer, after `propose` answered the same request (which checked
    it): the branches of each greedy sequence that asked for them (every sequence has an entry,
    in order)."""
    keys = [sequence_key(request.client_id, s.sequence_id) for s in request.sequences]
    branches = engine.draft_ahead(
        [(key, s.num_ahead) for key, s in zip(keys, request.sequences, strict=True) if s.num_ahead]
    )
    return draft_pb2.ProposeResponse(
        proposals=[
            draft_pb2.DraftProposal(
                sequence_id=s.sequence_id,
                branches=[
                    draft_pb2.DraftBranch(num_kept_tokens=b.num_kept, token_id=b.token_id, token_ids=b.token_ids)
                    for b in branches.get(key, [])
                ],
            )
            for key, s in zip(keys, request.sequences, strict=True)
        ],
        vocab_size=engine.vocab_size,
    )


def release(engine: DraftEngine, request: draft_pb2.ReleaseRequest) -> draft_pb2.ReleaseResponse:
    n = engine.release([sequence_key(request.client_id, sid) for sid in request.sequence_ids])
    return draft_pb2.ReleaseResponse(num_released=n)


class InProcessDraft:
    """A draft model in this process, behind the Draft stub's two methods (timeout and metadata
    are accepted and unused: the call runs on the caller's thread, the engine's)."""

    address = "in-process"

    def __init__(self, engine: DraftEngine):
        self.engine = engine

    def Propose(self, request: draft_pb2.ProposeRequest, timeout=None, metadata=None) -> draft_pb2.ProposeResponse:  # noqa: N802
        return propose(self.engine, request)

    def Release(self, request: draft_pb2.ReleaseRequest, timeout=None, metadata=None) -> draft_pb2.ReleaseResponse:  # noqa: N802
        return release(self.engine, request)
