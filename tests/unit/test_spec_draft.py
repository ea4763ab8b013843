"""The draft engine: proposals equal a fresh greedy run after any rollback, KV blocks come back,
sampled proposals carry the distribution they were drawn from; drafting ahead's branches are
what the draft proposes after their outcomes, and the decode worker takes a foreseen step's
proposals without waiting."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
import torch

from services.common import draft_calls
from services.common.draft_calls import sequence_key
from services.common.errors import InvalidArgument
from services.decode.draft_client import DraftProposer
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.draft import DraftAsk, DraftEngine
from shared.engine.spec import ProposalRequest
from shared.pb.tandem.v1 import draft_pb2
from shared.telemetry import TelemetryConfig, setup_telemetry
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


# -- drafting ahead (Draft.ProposeAhead) ---------------------------------------------------
# While the target verifies a call's proposals, the draft drafts the next step after each
# likely outcome. Each branch is what the draft would propose after its outcome; the next call
# adopts the branch its delta names with no compute, and drops the others; branch KV shares the
# sequence's blocks and always comes back. The decode worker's proposer takes a foreseen step's
# proposals without waiting, and keeps its bookkeeping in step with the draft whatever the outcome.

GREEDY_PARAMS = SamplingParams(temperature=0.0, max_tokens=64)


def ahead_engine(ckpt, num_blocks: int = 32, **kw) -> DraftEngine:
    config = EngineConfig(model=str(ckpt), num_blocks=num_blocks, block_size=8, enable_prefix_caching=False)
    return DraftEngine(config, **kw)


def all_free(eng: DraftEngine) -> bool:
    s = eng.stats()
    return s.num_free_blocks == s.num_total_blocks


@pytest.mark.parametrize("rows", [1, 5, 9])
def test_each_branch_is_what_the_draft_proposes_after_its_outcome(ckpt, greedy, rows):
    eng = ahead_engine(ckpt, ahead_rows=rows)
    proposals = eng.propose([DraftAsk("a", 0, PROMPT, 4, ahead=True)])[0].token_ids
    copy = PROMPT + proposals
    branches = eng.draft_ahead([("a", 3)])["a"]
    assert len(branches) == rows
    # the likeliest first: all four accepted, with the draft's own next token as the target's
    assert (branches[0].num_kept, branches[0].token_id) == (len(copy), greedy(copy, 1)[0])
    # then a rejection at each proposal in turn, the target picking the draft's runner-up
    assert [b.num_kept for b in branches[1:5]] == [len(PROMPT) + i for i in range(min(4, rows - 1))]
    for b in branches:
        if b.num_kept < len(copy):
            assert b.token_id != copy[b.num_kept]
        assert b.token_ids == greedy(copy[: b.num_kept] + [b.token_id], 3), b
    assert len({(b.num_kept, b.token_id) for b in branches}) == rows
    eng.release(["a"])
    assert all_free(eng)


def test_the_next_call_adopts_the_branch_its_delta_names_and_drops_the_rest(ckpt, greedy):
    eng = ahead_engine(ckpt)
    proposals = eng.propose([DraftAsk("a", 0, PROMPT, 4, ahead=True)])[0].token_ids
    held = eng.stats().num_free_blocks
    branches = eng.draft_ahead([("a", 4)])["a"]
    assert eng.stats().num_free_blocks < held  # each branch's own blocks; full blocks are shared
    b = branches[2]  # one proposal accepted, then the runner-up of the second
    assert b.num_kept == len(PROMPT) + 1
    seq = PROMPT + proposals[:1] + [b.token_id]
    # asking for fewer proposals than the branch has: its first ones, and the copy ends there
    answer = eng.propose([DraftAsk("a", b.num_kept, [b.token_id], 3)])[0]
    assert answer.token_ids == b.token_ids[:3] == greedy(seq, 3)
    assert eng.seqs["a"].token_ids == seq + b.token_ids[:3] and not eng.seqs["a"].branches
    # the adopted branch's KV serves the calls after it: rollback, extend, draft ahead again
    later = seq + b.token_ids[:2] + [7]
    assert eng.propose([DraftAsk("a", len(seq) + 2, [7], 4, ahead=True)])[0].token_ids == greedy(later, 4)
    for again in eng.draft_ahead([("a", 2)])["a"]:
        copy = eng.seqs["a"].token_ids
        assert again.token_ids == greedy(copy[: again.num_kept] + [again.token_id], 2)
    # an outcome no branch foresaw: computed afresh, every branch's blocks back
    copy = eng.seqs["a"].token_ids
    other = copy[: len(later)] + [9, 9]
    assert eng.propose([DraftAsk("a", len(later), [9, 9], 2)])[0].token_ids == greedy(other, 2)
    assert not eng.seqs["a"].branches
    eng.release(["a"])
    assert all_free(eng)


def test_asking_more_than_a_branch_has_or_sampling_computes_afresh(ckpt, greedy):
    eng = ahead_engine(ckpt)
    proposals = eng.propose([DraftAsk("a", 0, PROMPT, 4, ahead=True)])[0].token_ids
    b = eng.draft_ahead([("a", 2)])["a"][0]
    seq = PROMPT + proposals + [b.token_id]
    answer = eng.propose([DraftAsk("a", b.num_kept, [b.token_id], 4)])[0]
    assert answer.token_ids == greedy(seq, 4)
    # a sampled sequence gets no branches
    eng.propose([DraftAsk("s", 0, PROMPT, 3, SamplingParams(temperature=0.7, seed=1), ahead=True)])
    assert eng.draft_ahead([("s", 3)]) == {}
    eng.release(["a", "s"])
    assert all_free(eng)


def test_branches_never_cost_a_sequence_its_blocks(ckpt, greedy):
    eng = ahead_engine(ckpt, num_blocks=9, ahead_rows=5)
    eng.propose([DraftAsk("a", 0, PROMPT, 4, ahead=True)])  # 4 blocks
    eng.propose([DraftAsk("b", 0, [1, *range(60, 80)], 4)])  # 3 blocks: 2 left for branches
    branches = eng.draft_ahead([("a", 4)])["a"]
    assert 0 < len(branches) < 5 and set(eng.seqs) == {"a", "b"}
    assert eng.stats().num_free_blocks == 0
    # a sequence that needs room gets the branches' blocks before any sequence is evicted
    prompt = [1, *range(60, 80)] + [5, 5, 5]
    assert eng.propose([DraftAsk("b", 20, [5, 5, 5], 4)])[0].token_ids == greedy(prompt, 4)
    assert set(eng.seqs) == {"a", "b"} and not eng.seqs["a"].branches
    eng.release(["a", "b"])
    assert all_free(eng)


def test_a_released_sequence_frees_its_branches_and_is_not_drafted_ahead(ckpt):
    eng = ahead_engine(ckpt)
    eng.propose([DraftAsk("a", 0, PROMPT, 4, ahead=True)])
    eng.draft_ahead([("a", 4)])
    assert eng.release(["a"]) == 1 and all_free(eng)
    assert eng.draft_ahead([("a", 4)]) == {}


def test_num_ahead_beyond_the_limit_is_invalid(ckpt):
    eng = ahead_engine(ckpt)
    request = draft_pb2.ProposeRequest(
        client_id="c",
        sequences=[draft_pb2.DraftSequence(sequence_id="s", token_ids=PROMPT, num_proposals=4, num_ahead=17)],
    )
    with pytest.raises(InvalidArgument, match="num_ahead"):
        draft_calls.propose(eng, request)
    assert not eng.seqs


class _Stream:
    """A server-streaming call's iterator, answered already."""

    def __init__(self, responses):
        self._responses = iter(responses)

    def __next__(self):
        return next(self._responses)

    def cancel(self):
        return False


class _Unimplemented(grpc.RpcError, grpc.Call):
    """What a draft service from before ProposeAhead answers it with."""

    def code(self):
        return grpc.StatusCode.UNIMPLEMENTED

    def details(self):
        return "Method not found!"


class _Answered:
    """A unary method's `future`, answered already (the grpc.Future calls DraftProposer uses)."""

    def __init__(self, call):
        self._call = call

    def future(self, request, timeout=None, metadata=None):
        done = concurrent.futures.Future()
        done.set_result(self._call(request))
        return done


class AheadStub:
    """The Draft stub, answered by a draft engine in this process: ProposeAhead's two responses."""

    def __init__(self, engine: DraftEngine):
        self.engine = engine
        self.requests: list[draft_pb2.ProposeRequest] = []

    @property
    def Propose(self):  # noqa: N802
        return _Answered(lambda request: (self.requests.append(request), draft_calls.propose(self.engine, request))[1])

    def ProposeAhead(self, request, timeout=None, metadata=None):  # noqa: N802 (the proto's name)
        self.requests.append(request)
        return _Stream(
            [draft_calls.propose(self.engine, request), draft_calls.draft_ahead(self.engine, request)]
        )

    def Release(self, request, timeout=None, metadata=None):  # noqa: N802
        return draft_calls.release(self.engine, request)


def ahead_proposer(eng: DraftEngine, retry_s: float = 1.0) -> tuple[DraftProposer, AheadStub]:
    telemetry = setup_telemetry(TelemetryConfig(service_name="t"), set_global=False, configure_logs=False)
    proposer = DraftProposer("127.0.0.1:9", vocab_size=eng.vocab_size, timeout_s=5.0, retry_s=retry_s,
                             telemetry=telemetry, ahead=True, transport="grpc")  # fmt: skip
    stub = proposer._stub = AheadStub(eng)
    return proposer, stub


def test_a_foreseen_step_takes_its_proposals_without_waiting_and_the_bookkeeping_follows(ckpt, greedy):
    eng = ahead_engine(ckpt)
    proposer, stub = ahead_proposer(eng)
    key = sequence_key(proposer.client_id, "r")
    first = proposer.propose([ProposalRequest("r", PROMPT, 4, GREEDY_PARAMS, 4)])["r"].token_ids
    assert first == greedy(PROMPT, 4) and stub.requests[0].sequences[0].num_ahead == 4
    # verification accepts one proposal, then the target picks the draft's runner-up at the second
    token = next(t for (kept, t) in eng.seqs[key].branches if kept == len(PROMPT) + 1)
    seq = PROMPT + first[:1] + [token]
    foreseen = proposer.propose([ProposalRequest("r", seq, 3, GREEDY_PARAMS, 4)])["r"].token_ids
    assert foreseen == greedy(seq, 3) and proposer.num_foreseen == 1
    sent = stub.requests[-1].sequences[0]  # the call that has the draft adopt that branch
    assert (sent.num_kept_tokens, list(sent.token_ids)) == (len(PROMPT) + 1, [token])
    assert eng.seqs[key].token_ids == seq + foreseen
    # an outcome no branch foresaw: the step waits for the draft's answer, computed afresh
    seq2 = seq + foreseen[:2] + [3, 3]
    assert proposer.propose([ProposalRequest("r", seq2, 4, GREEDY_PARAMS, 4)])["r"].token_ids == greedy(
        seq2, 4
    )
    assert proposer.num_foreseen == 1 and proposer.num_failures == 0
    calls = proposer._telemetry.metrics.registry.get_sample_value("tandem_spec_draft_foreseen_calls_total")
    assert calls == 1
    proposer.release("r")
    assert not eng.seqs and all_free(eng)
    proposer.close()


def test_a_failed_call_after_a_foreseen_step_resends_the_sequence_whole(ckpt, greedy):
    eng = ahead_engine(ckpt)
    proposer, stub = ahead_proposer(eng, retry_s=0.0)
    key = sequence_key(proposer.client_id, "r")
    first = proposer.propose([ProposalRequest("r", PROMPT, 4, GREEDY_PARAMS, 4)])["r"].token_ids
    seq = PROMPT + first + [next(t for (kept, t) in eng.seqs[key].branches if kept == len(PROMPT) + 4)]
    real = stub.ProposeAhead

    def failing(request, timeout=None, metadata=None):
        real(request)  # the draft took the call (and adopted the branch), then the answer was lost
        return _Stream([])

    stub.ProposeAhead = failing
    assert proposer.propose([ProposalRequest("r", seq, 4, GREEDY_PARAMS, 4)])["r"].token_ids == greedy(seq, 4)
    assert proposer.propose([ProposalRequest("r", seq + [5], 4, GREEDY_PARAMS, 4)]) == {}  # reading it failed
    assert proposer.num_failures == 1
    stub.ProposeAhead = real
    seq2 = seq + [5, 6]
    assert proposer.propose([ProposalRequest("r", seq2, 4, GREEDY_PARAMS, 4)])["r"].token_ids == greedy(
        seq2, 4
    )
    assert stub.requests[-1].sequences[0].num_kept_tokens == 0  # whole, after the lost answer
    proposer.release("r")
    assert not eng.seqs and all_free(eng)


def test_a_draft_service_without_propose_ahead_gets_plain_calls(ckpt, greedy):
    eng = ahead_engine(ckpt)
    proposer, stub = ahead_proposer(eng)

    def unimplemented(request, timeout=None, metadata=None):
        class Failing(_Stream):
            def __next__(self):
                raise _Unimplemented()

        return Failing([])

    stub.ProposeAhead = unimplemented
    assert proposer.propose([ProposalRequest("r", PROMPT, 4, GREEDY_PARAMS, 4)]) == {}
    # no pause, no failure counted: the next step's call is a plain Propose
    proposals = proposer.propose([ProposalRequest("r", PROMPT, 4, GREEDY_PARAMS, 4)])["r"].token_ids
    assert proposals == greedy(PROMPT, 4) and proposer.num_failures == 0
    assert stub.requests[-1].sequences[0].num_ahead == 0
    proposer.release("r")
    assert not eng.seqs and all_free(eng)
