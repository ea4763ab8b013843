"""Batch policy: who runs this step and how many tokens each (continuous batching).

Every step: running decodes first (one token each), then running prefills in chunks, then
waiting requests join while the token budget, the running-sequence limit and free blocks
allow. When a running request cannot get a block, the most recently arrived running
request is preempted (its blocks freed, recomputed later from its tokens; its output so far
is kept). Knows nothing of tensors or the model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_manager import KVCacheManager
from .request import Request, Status

# A prefill chunk of a request collecting prompt logprobs keeps one row of logits per token
# (vocabulary-wide, float32: 0.5 MiB each for a 128k vocabulary): at most this many per step.
PROMPT_LOGPROBS_ROWS = 256


@dataclass
class ScheduledBatch:
    # (request, number of new tokens to compute this step), prefills first, decodes last
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose KV is already in place (imported from a prefill worker)."""
        req.status = Status.RUNNING
        self.running.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    @staticmethod
    def _token_cap(req: Request, budget: int) -> int:
        """The most tokens `req` may compute this step within `budget`."""
        return min(budget, PROMPT_LOGPROBS_ROWS) if req.collects_prompt_logprobs else budget

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # decodes first so that a long prompt's chunks never stall them
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.arrival))
        scheduled: set[int] = set()
        for req in order:
            if budget <= 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, self._token_cap(req, budget))
            while not self.kv.allocate_slots(req, n):
                victim = self._pick_victim(scheduled)
                if victim is None:
                    n = 0
                    break
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    n = 0
                    break
            if n == 0:
                continue
            scheduled.add(id(req))
            budget -= n
            if n == 1 and req.num_tokens - req.num_computed_tokens == 1:
                batch.decodes.append(req)
            else:
                batch.prefills.append((req, n))

        # waiting requests join unless this step had to preempt (memory is tight)
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            computed, num_cached = [], 0
            # a request collecting prompt logprobs computes every prompt token: no lookup, no hits
            looked_up = req.num_computed_tokens == 0 and not req.collects_prompt_logprobs
            if looked_up:
                computed, num_cached = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - req.num_computed_tokens - num_cached, self._token_cap(req, budget))
            if not self.kv.allocate_slots(req, n, computed):
                break
            self.waiting.popleft()
            req.mark_scheduled()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                self.kv.hit_tokens += num_cached
                self.kv.query_tokens += req.num_prompt_tokens if looked_up else 0
            req.num_computed_tokens += num_cached
            req.status = Status.RUNNING
            self.running.append(req)
            budget -= n
            if n == 1 and req.num_tokens - req.num_computed_tokens == 1:
                batch.decodes.append(req)
            else:
                batch.prefills.append((req, n))
        return batch

    def _pick_victim(self, scheduled: set[int]) -> Request | None:
        """The latest arrival among running requests not already scheduled this step."""
        candidates = [r for r in self.running if id(r) not in scheduled and r.status is Status.RUNNING]
        return max(candidates, key=lambda r: r.arrival) if candidates else None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
