"""Per-request state inside the engine: tokens, progress, blocks, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.params import FinishReason, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from .spec_policy import Ewma


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # finished, blocks kept for KV export (prefill side)
    RESERVED = "reserved"  # blocks reserved for imported KV (decode side)
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonic counter, for FCFS order
    hold_kv: bool = False
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache (-1: not looked up yet)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # outputs already produced before the engine saw this request (prefilled elsewhere)
    num_external_outputs: int = 0
    num_spec_proposed: int = 0
    num_spec_accepted: int = 0
    num_spec_steps: int = 0  # steps that verified drafts of this request
    draft_asked: bool = False  # the proposer has seen this request (its first call carries the prompt)
    spec_acceptance: Ewma | None = None  # its own per-token acceptance, from its first verification
    arrival_time: float | None = None  # time.monotonic() at add_request (None: KV imported, never queued)
    queue_seconds: float | None = None  # arrival_time to its first scheduling
    # SamplingParams.prompt_logprobs: prompt token i + 1's at index i, collected as prefill goes
    # (None: not asked, or handed out with the first output)
    prompt_logprobs: list[TokenLogprobs] | None = None
    # SamplingParams.guidance: the llguidance matcher, advanced by every output token
    matcher: Any = None

    @property
    def collects_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked and not all computed yet (the prefill must keep every row's logits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def mark_scheduled(self) -> None:
        if self.queue_seconds is None and self.arrival_time is not None:
            self.queue_seconds = time.monotonic() - self.arrival_time

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
