"""The draft service as TensorRT-LLM's drafter: `UserProvidedDecodingConfig(drafter=...)`.

TensorRT-LLM calls `Drafter.prepare_draft_tokens(scheduled_requests, resource_manager)` on its
executor's thread before each target step; the drafter sets `request.py_draft_tokens` on
every generation request, and TensorRT-LLM verifies them in the same forward pass. Here the
proposals come from Tandem's draft service through a `DraftClient`: one batched, synchronous
call per step (this is not the service's event loop), bounded by its own timeout. If the
draft service is slow or gone, the step goes on without drafts.

The drafter may be pickled into TensorRT-LLM's executor process, so it carries only a client
*factory* (a picklable callable) and opens its client lazily in whichever process runs it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftAsk:
    """Proposals wanted for one sequence: its whole token list (prompt + accepted tokens)."""

    seq_id: str
    token_ids: list[int]
    k: int


class DraftClient(Protocol):
    def propose(self, asks: Sequence[DraftAsk]) -> list[list[int]]:
        """Up to ask.k proposed tokens per ask, in order; raising means no drafts this step."""
        ...


class _RemoteDrafter:
    """Mixed into TensorRT-LLM's Drafter by `remote_drafter` (the base comes from the API)."""

    def __init__(self, client_factory: Callable[[], DraftClient], max_draft_len: int):
        _init_base(type(self).__mro__[2], self, max_draft_len)
        self.client_factory = client_factory
        self.max_draft_len = max_draft_len
        self.client: DraftClient | None = None
        self.num_failures = 0

    def prepare_draft_tokens(self, scheduled_requests: Any, resource_manager: Any = None) -> None:
        requests = list(scheduled_requests.generation_requests)
        asks = []
        for r in requests:
            tokens = list(r.get_tokens(0))
            # no proposals past the request's last position (TensorRT-LLM would reject them)
            room = r.py_orig_prompt_len + r.py_max_new_tokens - len(tokens) - 1
            asks.append(DraftAsk(str(r.request_id), tokens, max(0, min(self.max_draft_len, room))))
        wanted = [a for a in asks if a.k > 0]
        proposals: dict[str, list[int]] = {}
        if wanted:
            try:
                if self.client is None:
                    self.client = self.client_factory()
                for ask, tokens in zip(wanted, self.client.propose(wanted), strict=False):
                    proposals[ask.seq_id] = [int(t) for t in tokens[: ask.k]]
            except Exception as e:  # noqa: BLE001 - a missing draft only costs speed
                self.num_failures += 1
                log.warning("draft service unavailable, decoding without drafts this step: %s", e)
        for r, ask in zip(requests, asks, strict=True):
            r.py_draft_tokens = proposals.get(ask.seq_id, [])

    def __reduce__(self):
        return (remote_drafter, (type(self).__mro__[2], self.client_factory, self.max_draft_len))


def remote_drafter(drafter_base: type, client_factory: Callable[[], DraftClient], max_draft_len: int):
    """A TensorRT-LLM Drafter (subclass of `drafter_base`, i.e. api.Drafter) over a DraftClient."""
    cls = type("RemoteDrafter", (_RemoteDrafter, drafter_base), {"__module__": __name__})
    return cls(client_factory, max_draft_len)


def _init_base(base: type, self: Any, max_draft_len: int) -> None:
    """Drafter.__init__ grew arguments across releases: pass those this one takes."""
    offered = {
        "max_draft_len": max_draft_len,
        "max_total_draft_tokens": max_draft_len,
        "max_concurrency": None,
    }
    params = inspect.signature(base.__init__).parameters
    base.__init__(self, **{k: v for k, v in offered.items() if k in params})


class GrpcDraftClient:
    """A synchronous client of the draft service (protos/tandem/v1/draft.proto) for the drafter.

    Sends each sequence's delta against the draft's copy (the tokens of the previous call plus
    the proposals it returned): `num_kept_tokens` is their common prefix. Proposals are greedy
    (no sampling parameters): TensorRT-LLM verifies them against the target. Sequences that
    stop appearing are released with the next call; if the draft lost one, the next call sends
    it whole (num_kept_tokens = 0)."""

    def __init__(self, address: str, timeout_s: float = 0.5):
        import uuid

        import grpc

        from shared.pb.tandem.v1 import draft_pb2, draft_pb2_grpc

        self._pb = draft_pb2
        self._channel = grpc.insecure_channel(address)
        self._stub = draft_pb2_grpc.DraftStub(self._channel)
        self._timeout_s = timeout_s
        self.client_id = f"trtllm-{uuid.uuid4().hex[:12]}"
        self._copies: dict[str, list[int]] = {}  # the draft's copy of each sequence
        self._lost: set[str] = set()

    def propose(self, asks: Sequence[DraftAsk]) -> list[list[int]]:
        current = {a.seq_id for a in asks}
        released = [s for s in self._copies if s not in current]
        for s in released:
            del self._copies[s]
        sequences = []
        for ask in asks:
            copy = [] if ask.seq_id in self._lost else self._copies.get(ask.seq_id, [])
            kept = _common_prefix(copy, ask.token_ids)
            kept = min(kept, len(ask.token_ids) - 1)  # at least one token is sent
            sequences.append(
                self._pb.DraftSequence(
                    sequence_id=ask.seq_id,
                    num_kept_tokens=kept,
                    token_ids=ask.token_ids[kept:],
                    num_proposals=ask.k,
                )
            )
        self._lost.clear()
        response = self._stub.Propose(
            self._pb.ProposeRequest(client_id=self.client_id, sequences=sequences, released_ids=released),
            timeout=self._timeout_s,
        )
        out = []
        for ask, proposal in zip(asks, response.proposals, strict=True):
            if proposal.unknown_sequence:
                self._lost.add(ask.seq_id)
                self._copies.pop(ask.seq_id, None)
                out.append([])
                continue
            tokens = list(proposal.token_ids)
            self._copies[ask.seq_id] = list(ask.token_ids) + tokens
            out.append(tokens)
        return out

    def close(self) -> None:
        self._channel.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
