"""Speculative decoding: proposers and the verification rule.

A proposer suggests up to k next tokens per sequence (with the distribution q it drew them
from, or None when the proposal is deterministic). The target model scores all k + 1
positions in one forward pass; `verify` then keeps the longest acceptable prefix and adds
one token of its own, so every step yields between 1 and k + 1 tokens and the output
follows the target distribution exactly (Leviathan et al. 2023, Chen et al. 2023).
Knows nothing of gRPC: a remote draft service is just another Proposer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shared.params import SamplingParams


@dataclass
class ProposalRequest:
    request_id: str
    token_ids: list[int]  # prompt + output so far (the last one has no KV yet)
    num_tokens: int  # k: how many to propose at most
    params: SamplingParams
    max_tokens: int = 0  # the most a later step may ask of it (its k before the step's policy); 0: num_tokens


@dataclass
class Proposal:
    token_ids: list[int]  # length <= k
    probs: torch.Tensor | None = None  # [len, V] draft distribution q per position; None = deterministic


class Proposer(Protocol):
    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        """Proposals for some or all of the batch; a missing entry means "no speculation"."""
        ...

    def release(self, request_id: str) -> None:
        """The request ended: drop any state kept for it."""
        ...

    # Optional: `prefetch(batch)`, called as a step ends with the next step's batch when it is
    # already known; a remote proposer starts on it, and the next `propose` may get that batch.


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens and
    propose the tokens that followed it. No model, no state."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, batch: list[ProposalRequest]) -> dict[str, Proposal]:
        out = {}
        for req in batch:
            tokens = lookup_ngram(req.token_ids, req.num_tokens, self.max_ngram, self.min_ngram)
            if tokens:
                out[req.request_id] = Proposal(tokens)
        return out

    def release(self, request_id: str) -> None:
        pass


def lookup_ngram(tokens: Sequence[int], k: int, max_n: int, min_n: int) -> list[int]:
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = list(tokens[size - n:])
        # latest match first: recent context predicts best
        for start in range(size - n - 1, -1, -1):
            if list(tokens[start: start + n]) == tail:
                follow = list(tokens[start + n: start + n + k])
                if follow:
                    return follow
    return []


def verify(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
           greedy: bool, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Accept a prefix of the draft and add one token. Returns (tokens, number of drafts accepted).

    target_probs: [k + 1, V] target distribution at each draft position and one past it
    (for greedy: any scores whose argmax is the greedy token). draft_probs: [k, V] or None
    (deterministic proposal, i.e. q = one-hot on the draft token).
    """
    k = len(draft_tokens)
    if greedy:
        best = target_probs.argmax(dim=-1).tolist()  # [k + 1]
        m = 0
        while m < k and draft_tokens[m] == best[m]:
            m += 1
        return draft_tokens[:m] + [best[m]], m
    p = target_probs.float()
    u = torch.rand(k, generator=generator) if k else torch.empty(0)
    for i, x in enumerate(draft_tokens):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        p_x = float(p[i, x])
        # q(x) <= p(x): always accept; otherwise accept with probability p(x) / q(x)
        if q_x <= p_x or float(u[i]) * q_x < p_x:
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i].float().to(p.device)).clamp_min(0.0)
        total = residual.sum()
        residual = p[i] if total <= 0 else residual / total
        token = int(torch.multinomial(residual.cpu(), 1, generator=generator))
        return list(draft_tokens[:i]) + [token], i
    bonus = int(torch.multinomial(p[k].cpu(), 1, generator=generator))
    return list(draft_tokens) + [bonus], k
