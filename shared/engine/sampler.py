"""Logits -> next tokens, per request parameters, batched.

Order of transforms: logit bias, repetition penalty (as in HF `generate`), frequency and
presence penalties (OpenAI's, over the generated tokens only, as vLLM applies them), the
structured-output mask (tokens outside the requested format get -inf), then temperature,
top-k, top-p, min-p, and the draw. Greedy requests take the argmax after the penalties and
the mask. Returned logprobs are the raw model's, before any of these. A seeded request draws
its randomness from a generator seeded by (seed, output index), so its tokens do not depend
on the batch it runs in, nor on which worker (prefill or decode) samples a given position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.params import SamplingParams, TokenLogprobs

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far (for the penalties)
    # index of the token being sampled among the request's outputs: the last output_index
    # of token_ids are the generated ones (a resumed request's earlier outputs included)
    output_index: int
    allowed: torch.Tensor | None = None  # [V] bool: structured output's next tokens (None: any)


def sample(logits: torch.Tensor, rows: list[SamplingRow],
           generator: torch.Generator | None = None) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [B, V] float32 -> one token id per row, plus logprobs where asked."""
    raw_logprobs = None
    if any(r.params.logprobs for r in rows):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    logits = logits.clone()
    _apply_penalties(logits, rows)
    tokens = torch.empty(len(rows), dtype=torch.long)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1).cpu()  # tokens lives on the CPU
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        probs = _filtered_probs(logits[sampled], [rows[i].params for i in sampled])  # [S, V]
        # Exponential race: argmax(p / E), E ~ Exp(1), draws from p. Per-row noise lets a
        # seeded row use its own generator while unseeded rows share one draw.
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(sampled) if rows[i].params.seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=generator)
        for j, i in enumerate(sampled):
            seed = rows[i].params.seed
            if seed is not None:
                g = row_generator(seed, rows[i].output_index)
                noise[j] = torch.empty(probs.shape[1]).exponential_(generator=g)
        tokens[sampled] = (probs / noise.to(probs.device)).argmax(dim=-1).cpu()
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, r in enumerate(rows):
            if r.params.logprobs:
                logprobs[i] = token_logprobs(raw_logprobs[i], token_list[i], r.params.logprobs)
    return token_list, logprobs


def token_logprobs(logprobs_row: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    """logprobs_row: [V] log-softmax of the raw logits -> the token's logprob and the top n."""
    return rows_logprobs(logprobs_row[None], [token], n)[0]


def rows_logprobs(logprobs: torch.Tensor, tokens: list[int], n: int) -> list[TokenLogprobs]:
    """logprobs: [R, V] log-softmax rows, one per token -> each token's logprob and the top n of
    its row, in one gather and one topk."""
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None]).squeeze(1).tolist()
    top = logprobs.topk(n, dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    return [TokenLogprobs(token_id=t, logprob=lp, top=list(zip(i, v, strict=True)))
            for t, lp, i, v in zip(tokens, chosen, ids, values, strict=True)]


def target_distribution(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """What verification compares drafts against, one row per position: for greedy requests
    the penalised logits (their argmax is the greedy token), otherwise the
    probabilities that `sample` would draw from."""
    logits = logits.clone()
    _apply_penalties(logits, rows)
    if rows[0].params.greedy:
        return logits
    return _filtered_probs(logits, [r.params for r in rows])


def row_generator(seed: int, output_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(_row_seed(seed, output_index))


def _row_seed(seed: int, index: int) -> int:
    return (seed * _SEED_MIX + index) % (2**63 - 1)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place, per row: logit bias, repetition penalty, frequency and presence penalties, the
    structured-output mask."""
    for i, r in enumerate(rows):
        p = r.params
        if p.logit_bias:
            # ids past this model's vocabulary (a draft's may be smaller than its target's) are skipped
            bias = [(t, b) for t, b in p.logit_bias.items() if t < logits.shape[1]]
            if bias:
                ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
        if p.repetition_penalty != 1.0 and r.token_ids:
            ids = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long, device=logits.device)
            seen = logits[i, ids]
            # CTRL/HF rule: shrink positive logits, push negative ones further down
            logits[i, ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.output_index > 0:
            generated = r.token_ids[max(0, len(r.token_ids) - r.output_index) :]
            ids, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
            ids, counts = ids.to(logits.device), counts.to(logits.device, logits.dtype)
            # OpenAI's rule: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
            logits[i, ids] -= counts * p.frequency_penalty + p.presence_penalty
        if r.allowed is not None:
            logits[i].masked_fill_(~r.allowed.to(logits.device), float("-inf"))


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        for i, k in enumerate(top_k):
            if 0 < k < logits.shape[1]:
                kth = logits[i].topk(k).values[-1]
                logits[i] = logits[i].masked_fill(logits[i] < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device)
    if (top_p < 1.0).any():
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop the low tail whose mass is <= 1 - top_p, keep at least the top token
        drop = cum <= (1 - top_p)[:, None]
        drop[:, -1] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device)
    if (min_p > 0).any():
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
