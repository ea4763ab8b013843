"""The draft model's engine: per-sequence KV that rolls back and extends, k proposals per call.

The draft's copy of a sequence is the token list its caller last sent plus the tokens it
proposed then. Each call says how much of that copy is still valid (`num_kept`: the prefix
the target verified) and which tokens follow; the engine truncates the tokens and the KV to
the kept prefix, appends, and proposes up to k tokens. All sequences of a call run together:
one forward pass computes every sequence's uncomputed tail (one or two tokens normally, the
whole prompt of a new sequence, in chunks), then k - 1 single-token passes extend them.

Sampled sequences draw each proposal from the distribution the target's sampler would use
with the request's parameters (`target_distribution`), and return that distribution q, which
the target's rejection sampling needs. Greedy sequences propose the argmax and return no q.

Built from LLMEngine's pieces (model loading, KV sizing, ModelRunner, KVCacheManager) but not
its scheduler: a call runs to completion, there is no queue. Prefix caching stays off, since a
rolled-back block gets overwritten. Not thread-safe. Knows nothing of gRPC or decode workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from shared.draft_delta import common_prefix
from shared.params import InvalidRequest, SamplingParams

from .engine import EngineConfig, LLMEngine
from .runner import SeqInput
from .sampler import SamplingRow, row_generator, target_distribution

# Seeded proposals must not reuse the random stream the target's verification draws from for
# the same (seed, position): the acceptance test needs u independent of the draft's choice.
_DRAFT_SEED_SALT = 0x5DEECE66D
GREEDY = SamplingParams(temperature=0.0)
MAX_AHEAD_WIDTH = 3  # runner-ups per proposal that draft_ahead may branch on


@dataclass
class DraftAsk:
    key: str  # unique per sequence (the service scopes its callers' ids)
    num_kept: int  # tokens of the draft's copy still valid; 0: token_ids is the whole sequence
    token_ids: list[int]  # the sequence's tokens after the kept ones
    k: int  # proposals wanted
    params: SamplingParams | None = None  # None: greedy
    ahead: bool = False  # greedy: keep each proposal's runner-ups, for `draft_ahead` after this call


@dataclass
class DraftResult:
    key: str
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), V] float32 on cpu: q of each proposal; None for greedy
    unknown: bool = False  # no copy of this sequence (or num_kept beyond it): send the whole list


@dataclass
class DraftBranch:
    """One outcome of verifying a sequence's proposals (keep `num_kept` tokens of the copy, then
    the target's `token_id`), and the draft's proposals after it."""

    num_kept: int
    token_id: int
    token_ids: list[int]


@dataclass(eq=False)
class DraftSequence:
    request_id: str  # the KV manager's name for it: the ask's key
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_in_vocab: int = 0  # a prefix of token_ids checked to be in the draft's vocabulary
    last_used: float = 0.0
    # greedy proposals of the last call: each position's runner-ups (the likeliest tokens the
    # target picks where it rejects that proposal); empty after any other change
    alts: list[list[int]] = field(default_factory=list)
    # drafted ahead (draft_ahead): (num_kept, token) -> the copy that outcome would make, with
    # the next proposals; its KV blocks share the sequence's. Dropped by the next call.
    branches: dict[tuple[int, int], DraftSequence] = field(default_factory=dict)


@dataclass
class DraftStats:
    num_sequences: int
    num_free_blocks: int
    num_total_blocks: int


class DraftEngine:
    def __init__(
        self,
        config: EngineConfig,
        clock: Callable[[], float] = time.monotonic,
        ahead_rows: int = 5,
    ):
        if config.enable_prefix_caching:
            raise ValueError("the draft engine rolls KV back: enable_prefix_caching must be False")
        base = LLMEngine(config)  # loads the model and sizes the KV cache; its scheduler stays unused
        self.config = config
        self.model_config = base.model_config
        self.model_name = base.model_config.name
        self.runner = base.runner
        self.kv = base.kv
        self.max_model_len = base.max_model_len
        self.vocab_size = base.model_config.vocab_size
        self.seqs: dict[str, DraftSequence] = {}
        self._clock = clock
        self._generator = torch.Generator().manual_seed(config.seed)
        self.ahead_rows = ahead_rows
        # runner-ups kept per greedy proposal: enough to fill the rows after the all-accepted one
        self.ahead_width = min(MAX_AHEAD_WIDTH, max(1, ahead_rows - 1))

    # -- state --------------------------------------------------------------------------
    def release(self, keys: Iterable[str]) -> int:
        """Free these sequences; returns how many existed."""
        n = 0
        for key in keys:
            seq = self.seqs.pop(key, None)
            if seq is not None:
                self._drop_branches(seq)
                self.kv.free(key)
                n += 1
        return n

    def free_idle(self, max_idle_s: float) -> int:
        """Free sequences no call mentioned for max_idle_s seconds."""
        cutoff = self._clock() - max_idle_s
        return self.release([k for k, s in self.seqs.items() if s.last_used < cutoff])

    def stats(self) -> DraftStats:
        return DraftStats(len(self.seqs), self.kv.num_free_blocks, self.kv.pool.num_blocks)

    def _update(self, ask: DraftAsk) -> DraftSequence | None:
        """Apply the ask's delta to the copy; None when the copy is missing or too short."""
        seq = self.seqs.get(ask.key)
        if seq is not None:
            seq.alts = []
            self._drop_branches(seq)
        if ask.num_kept == 0:
            if seq is None:
                seq = self.seqs[ask.key] = DraftSequence(ask.key)
            # a resent whole list keeps whatever prefix (and KV) of the old copy still matches
            keep = common_prefix(seq.token_ids, ask.token_ids)
            new = ask.token_ids[keep:]
        elif seq is None or ask.num_kept > len(seq.token_ids):
            self.release([ask.key])
            return None
        else:
            keep, new = ask.num_kept, ask.token_ids
        seq.token_ids = seq.token_ids[:keep] + list(new)
        seq.num_in_vocab = min(seq.num_in_vocab, keep)
        # the last token's KV is always (re)computed: its logits give the first proposal
        valid = min(seq.num_computed_tokens, keep, len(seq.token_ids) - 1)
        if valid < seq.num_computed_tokens:
            seq.num_computed_tokens = valid
            self.kv.truncate(seq, valid)
        return seq

    def _in_vocab(self, seq: DraftSequence) -> bool:
        """Whether every token of the copy is one the draft knows (a target with a larger
        vocabulary may produce others). Each token is checked once, not on every call: a long
        sequence's whole list, every step, cost more than the step's new tokens."""
        ids, n = seq.token_ids, seq.num_in_vocab
        while n < len(ids) and 0 <= ids[n] < self.vocab_size:
            n += 1
        seq.num_in_vocab = n
        return n == len(ids)

    def _reserve(self, seq: DraftSequence, k: int, busy: set[str]) -> bool:
        """KV slots for the uncomputed tail and k - 1 proposals, evicting idle sequences if needed
        (branches drafted ahead go first)."""
        need = len(seq.token_ids) - seq.num_computed_tokens + k - 1
        if not self.kv.allocate_slots(seq, need):
            for other in self.seqs.values():
                self._drop_branches(other)
        while not self.kv.allocate_slots(seq, need):
            idle = [s for s in self.seqs.values() if s.request_id not in busy]
            if not idle:
                return False
            self.release([min(idle, key=lambda s: s.last_used).request_id])
        return True

    # -- proposing ----------------------------------------------------------------------
    def propose(self, asks: list[DraftAsk]) -> list[DraftResult]:
        """Apply every ask's delta, then propose; results in the order of the asks."""
        keys = [a.key for a in asks]
        if len(set(keys)) != len(keys):
            raise InvalidRequest("sequences", "a sequence appears twice in one call")
        now = self._clock()
        results: dict[str, DraftResult] = {}
        active: list[tuple[DraftSequence, DraftAsk, int]] = []
        for ask in asks:
            adopted = self._adopt(ask)
            if adopted is not None:
                results[ask.key] = adopted
                continue
            seq = self._update(ask)
            if seq is None:
                results[ask.key] = DraftResult(ask.key, [], unknown=True)
                continue
            seq.last_used = now
            # proposal i sits at position len + i; positions must stay below the model length
            k = min(ask.k, self.max_model_len - len(seq.token_ids))
            usable = k > 0 and self._in_vocab(seq)
            if usable and self._reserve(seq, k, set(keys)):
                active.append((seq, ask, k))
            else:
                results[ask.key] = DraftResult(ask.key, [])
        if active:
            results.update(self._run(active))
        return [results[k] for k in keys]

    # -- drafting ahead -----------------------------------------------------------------
    def draft_ahead(self, wanted: list[tuple[str, int]]) -> dict[str, list[DraftBranch]]:
        """For each (key, n): the sequence's likely outcomes of verifying the greedy proposals it
        just made, each drafted n proposals further. An outcome is "the first i proposals are
        accepted, then the target picks one of the draft's runner-ups at proposal i" (i < k), or
        "all k are accepted, then the target's token is the draft's own next choice". The likeliest
        are drafted, `ahead_rows` in all (split among the sequences): all accepted, then each
        proposal's runner-up, then each one's next runner-up. (Ranking them by the draft's own
        probabilities found fewer of the target's outcomes on the demo model.) The branches stay
        until the sequence's next call, which adopts the one its delta names (`propose`) and drops
        the rest. Branch KV shares the sequence's full blocks; a branch that gets no free block
        is left out (no sequence is evicted for one)."""
        forks: list[tuple[DraftSequence, DraftSequence, int, int | None]] = []
        active: list[tuple[DraftSequence, DraftAsk, int]] = []
        wanted = [(seq, n) for key, n in wanted if (seq := self.seqs.get(key)) is not None and seq.alts and n > 0]
        for seq, n in wanted:  # (the others were released since, are sampled, or proposed nothing)
            self._drop_branches(seq)
            base = len(seq.token_ids) - len(seq.alts)
            # the likeliest outcomes first: all accepted, then each proposal's runner-up, then the next ones
            outcomes = [(len(seq.token_ids), [])] + [
                (base + i, [alts[rank]])
                for rank in range(self.ahead_width)
                for i, alts in enumerate(seq.alts)
                if rank < len(alts)
            ]
            for i, (num_kept, extra) in enumerate(outcomes[: max(1, self.ahead_rows // len(wanted))]):
                # the all-accepted outcome drafts one more: its first token is the guessed target token
                k = min(n + (not extra), self.max_model_len - num_kept - len(extra))
                if k < 1 + (not extra):
                    continue
                fork = self._fork(seq, f"ahead/{i}/{seq.request_id}", num_kept, extra, k)
                if fork is not None:
                    forks.append((seq, fork, num_kept, extra[0] if extra else None))
                    active.append((fork, DraftAsk(fork.request_id, 0, [], k, ahead=True), k))
        if not active:
            return {}
        proposed = self._run(active)
        out: dict[str, list[DraftBranch]] = {}
        for seq, fork, num_kept, token in forks:
            tokens = proposed[fork.request_id].token_ids
            if token is None:  # all accepted: the guessed target token, then the proposals
                token, tokens = tokens[0], tokens[1:]
                fork.alts = fork.alts[1:]
            seq.branches[(num_kept, token)] = fork
            out.setdefault(seq.request_id, []).append(DraftBranch(num_kept, token, tokens))
        return out

    def _fork(self, seq: DraftSequence, key: str, num_kept: int, extra: list[int], k: int) -> DraftSequence | None:
        """A branch of `seq`: its first num_kept tokens then `extra`, with KV slots for k
        proposals. Full blocks of valid KV are shared; the partly valid one is copied."""
        fork = DraftSequence(key, seq.token_ids[:num_kept] + extra, last_used=seq.last_used)
        fork.num_in_vocab = len(fork.token_ids)  # the draft's own tokens
        computed = fork.num_computed_tokens = min(seq.num_computed_tokens, num_kept, len(fork.token_ids) - 1)
        copy = self.kv.fork(seq.request_id, key, computed)
        if copy is None:
            return None
        if copy[0] >= 0:
            self.runner.copy_block(*copy)
        if not self.kv.allocate_slots(fork, len(fork.token_ids) - computed + k - 1):
            self.kv.free(key)
            return None
        return fork

    def _adopt(self, ask: DraftAsk) -> DraftResult | None:
        """The ask's delta is an outcome drafted ahead, and it wants no more proposals than that
        branch has: the branch becomes the sequence's copy, and its proposals the answer."""
        seq = self.seqs.get(ask.key)
        if seq is None or not seq.branches or len(ask.token_ids) != 1 or ask.params is not None:
            return None
        fork = seq.branches.pop((ask.num_kept, ask.token_ids[0]), None)
        if fork is None:
            return None
        outcome = ask.num_kept + 1
        proposals = fork.token_ids[outcome:]
        if not 0 < ask.k <= len(proposals):
            self.kv.free(fork.request_id)
            return None
        self._drop_branches(seq)
        self.kv.move(fork.request_id, seq.request_id)
        seq.token_ids = fork.token_ids[: outcome + ask.k]
        seq.alts = fork.alts[: ask.k]
        seq.num_in_vocab = len(seq.token_ids)
        seq.num_computed_tokens = min(fork.num_computed_tokens, len(seq.token_ids) - 1)
        self.kv.truncate(seq, seq.num_computed_tokens)
        seq.last_used = self._clock()
        return DraftResult(ask.key, proposals[: ask.k])

    def _drop_branches(self, seq: DraftSequence) -> None:
        for fork in seq.branches.values():
            self.kv.free(fork.request_id)
        seq.branches.clear()

    @torch.inference_mode()
    def _run(self, active: list[tuple[DraftSequence, DraftAsk, int]]) -> dict[str, DraftResult]:
        logits = self._extend([seq for seq, _, _ in active])  # key -> [V] at each last token
        proposed: dict[str, list[int]] = {seq.request_id: [] for seq, _, _ in active}
        probs: dict[str, list[torch.Tensor]] = {seq.request_id: [] for seq, _, _ in active}
        running = active
        for seq, _, _ in active:
            seq.alts = []
        for i in range(max(k for _, _, k in active)):
            running = [(s, a, k) for s, a, k in running if k > i]
            tokens, q, alts = self._choose(running, torch.stack([logits[s.request_id] for s, _, _ in running]))
            for (seq, _, _), token, q_row, alt in zip(running, tokens, q, alts, strict=True):
                seq.token_ids.append(token)
                proposed[seq.request_id].append(token)
                if q_row is not None:
                    probs[seq.request_id].append(q_row)
                if alt is not None:
                    seq.alts.append(alt)
            running = [(s, a, k) for s, a, k in running if k > i + 1]
            if not running:
                break
            # one step for each sequence that proposes more: the token just chosen, KV included
            step = self.runner.forward(
                [],
                [SeqInput(s.token_ids, len(s.token_ids) - 1, 1, self.kv.block_ids(s.request_id)) for s, _, _ in running],
                [1] * len(running),
            )
            for row, (seq, _, _) in enumerate(running):
                seq.num_computed_tokens += 1
                logits[seq.request_id] = step[row]
        return {
            key: DraftResult(key, tokens, torch.stack(probs[key]) if probs[key] else None)
            for key, tokens in proposed.items()
        }

    def _extend(self, seqs: list[DraftSequence]) -> dict[str, torch.Tensor]:
        """Compute each sequence's uncomputed tokens (chunked under the token budget);
        returns the logits [V] at each one's last token."""
        out: dict[str, torch.Tensor] = {}
        todo = list(seqs)
        while todo:
            budget = self.config.max_num_batched_tokens
            chosen: list[tuple[DraftSequence, int, bool]] = []
            for seq in todo:
                n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
                if n <= 0:
                    break
                chosen.append((seq, n, seq.num_computed_tokens + n == len(seq.token_ids)))
                budget -= n
            logits = self.runner.forward(
                [SeqInput(s.token_ids, s.num_computed_tokens, n, self.kv.block_ids(s.request_id)) for s, n, _ in chosen],
                [],
                [1 if done else 0 for _, _, done in chosen],
            )
            row = 0
            for seq, n, done in chosen:
                seq.num_computed_tokens += n
                if done:
                    out[seq.request_id] = logits[row]
                    row += 1
            todo = [s for s in todo if s.request_id not in out]
        return out

    def _choose(self, running, logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor | None], list[list[int] | None]]:
        """logits: [B, V] -> one proposal per sequence, the q it was drawn from (None: greedy),
        and the runner-ups of a greedy one that drafts ahead (else None)."""
        tokens: list[int] = [0] * len(running)
        q: list[torch.Tensor | None] = [None] * len(running)
        alts: list[list[int] | None] = [None] * len(running)
        rows = [SamplingRow(a.params or GREEDY, s.token_ids, len(s.token_ids)) for s, a, _ in running]
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            scores = target_distribution(logits[greedy].float(), [rows[i] for i in greedy])
            if any(running[i][1].ahead for i in greedy):
                ranked = scores.topk(min(1 + self.ahead_width, scores.shape[-1]), dim=-1).indices.tolist()
                for i, (t, *alt) in zip(greedy, ranked, strict=True):
                    tokens[i], alts[i] = t, alt if running[i][1].ahead else None
            else:
                for i, t in zip(greedy, scores.argmax(dim=-1).tolist(), strict=True):
                    tokens[i] = t
        if sampled:
            dist = target_distribution(logits[sampled].float(), [rows[i] for i in sampled]).cpu()  # [S, V]
            for j, i in enumerate(sampled):
                seed = rows[i].params.seed
                gen = self._generator if seed is None else row_generator(seed ^ _DRAFT_SEED_SALT, rows[i].output_index)
                tokens[i] = int(torch.multinomial(dist[j], 1, generator=gen))
                q[i] = dist[j]
        return tokens, q, alts


def probs_to_bytes(probs: torch.Tensor) -> bytes:
    """[n, V] probabilities -> float16 little-endian, row-major (the draft service's wire form)."""
    return probs.to(torch.float16).cpu().numpy().astype("<f2").tobytes()


def probs_from_bytes(data: bytes, num_rows: int) -> torch.Tensor:
    """The inverse of probs_to_bytes: -> [num_rows, V] float32."""
    import numpy as np

    flat = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
    if num_rows == 0 or flat.numel() % num_rows:
        raise ValueError(f"{flat.numel()} probabilities do not split into {num_rows} rows")
    return flat.view(num_rows, -1)
