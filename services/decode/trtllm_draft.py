"""The draft service's client for TensorRT-LLM's drafter (shared/engines/trtllm/drafter.py).

A synchronous client (the drafter runs on TensorRT-LLM's executor thread, once per step),
opened lazily in whichever process runs the drafter: `draft_client_factory` is picklable.
The delta protocol is shared/draft_delta.py's; a sequence that stops appearing in the asks has
ended and is released with the next call. Proposals are greedy (no sampling parameters):
TensorRT-LLM verifies them against the target.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence

from services.common.server import CHANNEL_OPTIONS
from services.common.tls import PLAINTEXT, Tls
from shared.draft_delta import DeltaTracker
from shared.engines.trtllm import DraftAsk, DraftClient
from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc


def draft_client_factory(address: str, timeout_s: float, tls: Tls = PLAINTEXT) -> Callable[[], DraftClient]:
    return functools.partial(GrpcDraftClient, address, timeout_s, tls)


class GrpcDraftClient:
    def __init__(self, address: str, timeout_s: float = 0.5, tls: Tls = PLAINTEXT):
        self._channel = tls.channel(address, options=CHANNEL_OPTIONS)
        self._stub = draft_pb2_grpc.DraftStub(self._channel)
        self._timeout_s = timeout_s
        self.client_id = f"trtllm-{uuid.uuid4().hex[:12]}"
        self._delta = DeltaTracker()

    def propose(self, asks: Sequence[DraftAsk]) -> list[list[int]]:
        current = {a.seq_id for a in asks}
        for seq_id in self._delta.tracked():
            if seq_id not in current:
                self._delta.release(seq_id)
        sequences = []
        for ask in asks:
            delta = self._delta.delta(ask.seq_id, ask.token_ids)
            sequences.append(
                draft_pb2.DraftSequence(
                    sequence_id=ask.seq_id,
                    num_kept_tokens=delta.num_kept,
                    token_ids=delta.token_ids,
                    num_proposals=ask.k,
                )
            )
        released = self._delta.releases
        self._delta.sent([a.seq_id for a in asks])
        response = self._stub.Propose(
            draft_pb2.ProposeRequest(client_id=self.client_id, sequences=sequences, released_ids=released),
            timeout=self._timeout_s,
        )
        self._delta.releases_delivered(released)
        out = []
        for ask, proposal in zip(asks, response.proposals, strict=True):
            if proposal.unknown_sequence:
                self._delta.unknown(ask.seq_id)
                out.append([])
                continue
            tokens = list(proposal.token_ids)
            self._delta.answered(ask.seq_id, ask.token_ids, tokens)
            out.append(tokens)
        return out

    def close(self) -> None:
        self._channel.close()
