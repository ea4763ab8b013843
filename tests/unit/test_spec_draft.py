"""The draft engine: proposals equal a fresh greedy run after any rollback, KV blocks come back,
sampled proposals carry the distribution they were drawn from."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.draft import DraftAsk, DraftEngine
from tests.helpers.models import make_tiny_checkpoint

PROMPT = [1, *range(20, 45)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("draft"))


@pytest.fixture(scope="module")
def greedy(ckpt):
    engine = LLMEngine(EngineConfig(model=str(ckpt), num_blocks=64, block_size=8))

    def run(prompt: list[int], n: int) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]

    return run


def draft_engine(ckpt, clock=None, **kw) -> DraftEngine:
    cfg = dict(
        model=str(ckpt), num_blocks=32, block_size=8, enable_prefix_caching=False, max_num_batched_tokens=16
    )
    cfg.update(kw)
    return DraftEngine(EngineConfig(**cfg)) if clock is None else DraftEngine(EngineConfig(**cfg), clock)


def test_rollback_and_extend_match_fresh_greedy(ckpt, greedy):
    eng = draft_engine(ckpt)
    first = eng.propose([DraftAsk("a", 0, PROMPT, 4)])[0]
    assert first.token_ids == greedy(PROMPT, 4) and first.probs is None
    # the target accepted two proposals and added a token of its own (say 7)
    seq = PROMPT + first.token_ids[:2] + [7]
    second = eng.propose([DraftAsk("a", len(PROMPT) + 2, [7], 3)])[0]
    assert second.token_ids == greedy(seq, 3)
    # all accepted plus a bonus: the copy is kept whole, two tokens to compute
    seq2 = seq + second.token_ids + [9]
    third = eng.propose([DraftAsk("a", len(seq) + 3, [9], 4)])[0]
    assert third.token_ids == greedy(seq2, 4)
    # a whole-list resend that matches the copy reuses it
    fourth = eng.propose([DraftAsk("a", 0, seq2 + third.token_ids[:1] + [5], 2)])[0]
    assert fourth.token_ids == greedy(seq2 + third.token_ids[:1] + [5], 2)
    assert eng.release(["a"]) == 1
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_batch_of_mixed_sequences_and_unknown(ckpt, greedy):
    eng = draft_engine(ckpt)
    prompts = {"long": [1, *range(50, 90)], "short": [1, 5], "mid": [1, *range(100, 112)]}
    res = eng.propose([DraftAsk(k, 0, p, 1 + i) for i, (k, p) in enumerate(prompts.items())])
    for i, (r, p) in enumerate(zip(res, prompts.values(), strict=True)):
        assert r.token_ids == greedy(p, 1 + i)
    # a sequence the draft never saw, and one whose kept prefix exceeds the copy
    res = eng.propose([DraftAsk("ghost", 3, [4], 2), DraftAsk("short", 40, [4], 2)])
    assert [r.unknown for r in res] == [True, True]
    assert "short" not in eng.seqs
    assert eng.release(prompts) == 2
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_a_token_outside_the_drafts_vocabulary_stops_its_proposals_until_rolled_back(ckpt, greedy):
    """A target with a larger vocabulary: the draft cannot read such a token, so it proposes
    nothing while the token is in the sequence's copy, and again once the copy drops it."""
    eng = draft_engine(ckpt)
    first = eng.propose([DraftAsk("a", 0, PROMPT, 2)])[0]
    seq = PROMPT + first.token_ids[:1]
    outside = eng.vocab_size + 3
    assert eng.propose([DraftAsk("a", len(seq), [outside], 2)])[0].token_ids == []
    assert eng.propose([DraftAsk("a", len(seq) + 1, [5], 2)])[0].token_ids == []  # still in the copy
    assert eng.propose([DraftAsk("a", len(seq), [5], 2)])[0].token_ids == greedy(seq + [5], 2)
    assert eng.release(["a"]) == 1
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_idle_sequences_are_freed_and_evicted_for_room(ckpt):
    now = [0.0]
    eng = draft_engine(ckpt, clock=lambda: now[0], num_blocks=8)
    eng.propose([DraftAsk("old", 0, [1, *range(10, 40)], 2)])  # 4 of 8 blocks
    now[0] = 5.0
    eng.propose([DraftAsk("new", 0, [1, *range(60, 100)], 2)])  # needs 6: "old" is evicted
    assert set(eng.seqs) == {"new"}
    now[0] = 100.0
    assert eng.free_idle(30.0) == 1
    assert eng.stats().num_free_blocks == 8


def test_sampled_proposals_carry_their_distribution(ckpt):
    eng = draft_engine(ckpt)
    params = SamplingParams(temperature=0.8, top_k=20, seed=3)
    r = eng.propose([DraftAsk("s", 0, PROMPT, 4, params)])[0]
    assert r.probs is not None and r.probs.shape == (4, eng.vocab_size)
    assert torch.allclose(r.probs.sum(dim=-1), torch.ones(4), atol=1e-4)
    assert all(r.probs[i, t] > 0 for i, t in enumerate(r.token_ids))
    assert all(int((row > 0).sum()) <= 20 for row in r.probs)  # top-k applied
    # seeded: the same copy proposes the same tokens again
    again = draft_engine(ckpt).propose([DraftAsk("s", 0, PROMPT, 4, params)])[0]
    assert again.token_ids == r.token_ids
