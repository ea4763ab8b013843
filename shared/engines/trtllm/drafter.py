"""The draft service as TensorRT-LLM's drafter: `UserProvidedDecodingConfig(drafter=...)`.

The executor's contract (_torch/pyexecutor/py_executor.py, `PyExecutor._executor_loop`): once
per step, on the executor's thread and synchronously, it calls
`drafter.prepare_draft_tokens(scheduled_batch, resource_manager)` with *all* the step's
requests, then `drafter.pad_draft_tokens_for_cuda_graph(...)` pads every generation request's
`py_draft_tokens` to the static maximum with zeros, then runs one target forward pass that
verifies them. The overlap scheduler is off for user-provided drafting, so each request's
`get_tokens(0)` already holds the previous step's accepted tokens.

So the drafter here makes one batched call to Tandem's draft service per step (bounded by the
client's timeout; this is not an event loop), for the generation requests only, and sets a
list of at most max_draft_len tokens on each of them (an empty one when the draft had none).
It sets `_needs_padding_kv_extension`: TensorRT-LLM's TorchSampler, which verifies user-provided
drafts, rewinds the KV by the *padded* draft length, so the base class must extend the KV
capacity after padding (_torch/speculative/drafter.py, `Drafter.pad_draft_tokens_for_cuda_graph`).
If the draft service is slow or gone, the step goes on without drafts, and the draft is left
alone for `retry_s` (TANDEM_DRAFT_RETRY_S) so that a dead draft does not cost every step its
timeout; it is tried again after that.

The drafter may be pickled into TensorRT-LLM's executor process, so it carries only a client
*factory* (a picklable callable) and opens its client lazily in whichever process runs it.
Nothing here imports grpc: the client comes from the worker (services/decode/trtllm_draft.py).
"""

from __future__ import annotations

import inspect
import logging
import time
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

    # the verifying sampler rewinds by the padded draft length (see the module docstring)
    _needs_padding_kv_extension = True

    def __init__(
        self,
        client_factory: Callable[[], DraftClient],
        max_draft_len: int,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        _init_base(type(self).__mro__[2], self, max_draft_len)
        self.client_factory = client_factory
        self.max_draft_len = max_draft_len
        self.retry_s = retry_s
        self.clock = clock
        self.client: DraftClient | None = None
        self.num_failures = 0
        self._retry_at = 0.0
        self._failing = False

    def prepare_draft_tokens(self, scheduled_requests: Any, resource_manager: Any = None) -> None:
        requests = list(scheduled_requests.generation_requests)
        asks = []
        for r in requests:
            tokens = list(r.get_tokens(0))
            # no proposals past the request's last position (TensorRT-LLM would reject them)
            room = r.py_orig_prompt_len + r.py_max_new_tokens - len(tokens) - 1
            asks.append(DraftAsk(str(r.request_id), tokens, max(0, min(self.max_draft_len, room))))
        wanted = [a for a in asks if a.k > 0] if self.clock() >= self._retry_at else []
        proposals: dict[str, list[int]] = {}
        if wanted:
            try:
                if self.client is None:
                    self.client = self.client_factory()
                answers = self.client.propose(wanted)
                if len(answers) != len(wanted):
                    raise ValueError(f"{len(answers)} proposals for {len(wanted)} sequences")
                for ask, tokens in zip(wanted, answers, strict=True):
                    proposals[ask.seq_id] = [int(t) for t in tokens[: ask.k]]
                if self._failing:
                    log.info("draft service answers again: speculating")
                    self._failing = False
            except Exception as e:  # noqa: BLE001 - a missing draft only costs speed
                self.num_failures += 1
                self._retry_at = self.clock() + self.retry_s
                if not self._failing:
                    log.warning(
                        "draft service unavailable (%s): decoding without drafts, trying again every %.1f s",
                        e,
                        self.retry_s,
                    )
                    self._failing = True
        for r, ask in zip(requests, asks, strict=True):
            r.py_draft_tokens = list(proposals.get(ask.seq_id, []))  # a list of its own: padding extends it

    def __reduce__(self):
        return (remote_drafter, (type(self).__mro__[2], self.client_factory, self.max_draft_len, self.retry_s))


def remote_drafter(
    drafter_base: type, client_factory: Callable[[], DraftClient], max_draft_len: int, retry_s: float = 2.0
):
    """A TensorRT-LLM Drafter (subclass of `drafter_base`, i.e. api.Drafter) over a DraftClient."""
    cls = type("RemoteDrafter", (_RemoteDrafter, drafter_base), {"__module__": __name__})
    return cls(client_factory, max_draft_len, retry_s)


def _init_base(base: type, self: Any, max_draft_len: int) -> None:
    """Drafter.__init__ grew arguments across releases (max_concurrency only; then max_draft_tokens;
    now max_draft_len, max_total_draft_tokens, max_concurrency, draft_len_schedule): pass
    those this one takes. The padding reads max_total_draft_tokens, so it must be set."""
    offered = {
        "max_draft_len": max_draft_len,
        "max_total_draft_tokens": max_draft_len,  # user-provided drafting is a linear chain
        "max_draft_tokens": max_draft_len,
        "max_concurrency": None,
    }
    params = inspect.signature(base.__init__).parameters
    base.__init__(self, **{k: v for k, v in offered.items() if k in params})
