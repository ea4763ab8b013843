"""Speculative decoding: verification keeps greedy outputs exact and preserves sampled distributions."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.spec import NgramProposer, Proposal, lookup_ngram, verify
from tests.helpers.models import make_tiny_checkpoint

PROMPTS = [[1, *range(5, 45)], [1, 30, 31, 30, 31], [1, *range(100, 119)], [1, *range(200, 260)], [1, 7]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("spec"))


def engine(ckpt, **kw) -> LLMEngine:
    # the proposers here test verification, not the policy that may turn them down (adaptive)
    cfg = dict(model=str(ckpt), num_blocks=96, block_size=8, max_num_batched_tokens=64, adaptive_speculation=False)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


class OracleProposer:
    """Proposes the true greedy continuation, corrupting every third draft token, with a
    made-up draft distribution: exercises both the accept and the reject path."""

    def __init__(self, reference: dict[tuple, list[int]], vocab: int):
        self.reference, self.vocab = reference, vocab
        self.released: list[str] = []

    def propose(self, batch):
        out = {}
        for req in batch:
            for prompt, full in self.reference.items():
                if tuple(req.token_ids[: len(prompt)]) == prompt:
                    done = len(req.token_ids) - len(prompt)
                    drafts = full[done: done + req.num_tokens]
                    drafts = [(t + 1) % self.vocab if (done + i) % 3 == 2 else t for i, t in enumerate(drafts)]
                    probs = torch.full((len(drafts), self.vocab), 0.5 / self.vocab)
                    probs[torch.arange(len(drafts)), drafts] += 0.5
                    if drafts:
                        out[req.request_id] = Proposal(drafts, probs)
        return out

    def release(self, request_id):
        self.released.append(request_id)


def run_all(eng: LLMEngine, prompts, params):
    ids = [str(i) for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, p, params)
    toks = {rid: [] for rid in ids}
    finals = {}
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
            if o.finished:
                finals[o.request_id] = o
    return [toks[r] for r in ids], finals


GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def test_greedy_with_draft_proposals_equals_plain_decoding(ckpt):
    ref, _ = run_all(engine(ckpt), PROMPTS, GREEDY)
    eng = engine(ckpt)
    oracle = OracleProposer({tuple(p): r for p, r in zip(PROMPTS, ref, strict=True)}, 400)
    eng.set_proposer(oracle)
    got, finals = run_all(eng, PROMPTS, GREEDY)
    assert got == ref
    proposed = sum(f.num_spec_proposed for f in finals.values())
    accepted = sum(f.num_spec_accepted for f in finals.values())
    assert proposed > 0 and 0 < accepted < proposed  # both paths taken
    assert sorted(set(oracle.released)) == sorted(finals)  # draft state released
    s = eng.stats()
    assert s.num_free_blocks == s.num_total_blocks and not eng.requests  # rejected positions leaked nothing


class PrefetchingProposer(OracleProposer):
    """Records what the engine prefetches after a step and what each step then asks for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.prefetched: list[list[tuple]] = []
        self.proposed: list[list[tuple]] = []

    @staticmethod
    def _batch(batch) -> list[tuple]:
        return [(r.request_id, len(r.token_ids), r.num_tokens) for r in batch]

    def prefetch(self, batch):
        self.prefetched.append(self._batch(batch))

    def propose(self, batch):
        self.proposed.append(self._batch(batch))
        return super().propose(batch)


def test_the_next_steps_asks_are_prefetched_when_its_batch_is_known(ckpt):
    ref, _ = run_all(engine(ckpt), PROMPTS, GREEDY)
    eng = engine(ckpt, num_speculative_tokens=3)
    proposer = PrefetchingProposer({tuple(p): r for p, r in zip(PROMPTS, ref, strict=True)}, 400)
    eng.set_proposer(proposer)
    got, _ = run_all(eng, PROMPTS, GREEDY)
    assert got == ref
    # no request arrives while they run: each prefetched batch is the next step's, and the
    # steps whose batch could not be known (a prompt still in chunks) asked anyway
    assert 0 < len(proposer.prefetched) < len(proposer.proposed)
    assert all(batch in proposer.proposed for batch in proposer.prefetched)
    # every step that asked is counted once by its k, prefetched or not
    assert sum(eng.stats().spec_steps_by_k[1:]) == len(proposer.proposed)

    # a request aborted after the prefetch: the step asks for the batch it has, not the one planned
    want = {rid: r for rid, r in zip("xy", (ref[4], ref[1]), strict=True)}
    toks = {"x": [], "y": []}
    eng.add_request("x", PROMPTS[4], GREEDY)
    eng.add_request("y", PROMPTS[1], GREEDY)
    for _ in range(2):
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
    assert [rid for rid, _, _ in proposer.prefetched[-1]] == ["x", "y"]
    eng.abort("y")
    num_tokens = len(PROMPTS[4]) + len(toks["x"])
    for o in eng.step():
        toks[o.request_id] += o.new_token_ids
    assert proposer.proposed[-1] == [("x", num_tokens, 3)]
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id] += o.new_token_ids
    assert toks["x"] == want["x"] and toks["y"] == want["y"][: len(toks["y"])]
    s = eng.stats()
    assert s.num_free_blocks == s.num_total_blocks and not eng.requests


def test_greedy_with_ngram_equals_plain_decoding(ckpt):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref, _ = run_all(engine(ckpt), PROMPTS, params)
    eng = engine(ckpt, num_speculative_tokens=3)
    eng.set_proposer(NgramProposer())
    got, finals = run_all(eng, PROMPTS, params)
    assert got == ref
    assert sum(f.num_spec_accepted for f in finals.values()) > 0


def test_speculation_off_per_request_and_max_tokens_respected(ckpt):
    eng = engine(ckpt)
    eng.set_proposer(NgramProposer())
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, num_speculative_tokens=0)
    (out,), finals = run_all(eng, [PROMPTS[1]], params)
    assert len(out) == 7 and finals["0"].num_spec_proposed == 0
    (out,), finals = run_all(eng, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert len(out) == 7  # never overshoots max_tokens even when k + 1 tokens are accepted


def test_ngram_lookup():
    assert lookup_ngram([1, 2, 3, 9, 1, 2, 3], 2, 3, 1) == [9, 1]
    assert lookup_ngram([5, 6, 7], 2, 3, 1) == []


# chi-square critical values at significance 0.001 (fixed seeds: the test cannot flake)
CHI2_CRIT_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def _chi_square_ok(observed: torch.Tensor, expected_probs: torch.Tensor) -> bool:
    expected = expected_probs * observed.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    return stat < CHI2_CRIT_0001[len(observed) - 1]


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_rejection_sampling_preserves_target_distribution(deterministic_draft):
    """On a 6-token vocabulary: draws from q, verified against p, come out distributed as p."""
    g = torch.Generator().manual_seed(7)
    v, k, n = 6, 2, 20000
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                      [0.05, 0.05, 0.50, 0.20, 0.10, 0.10],
                      [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
    q = torch.tensor([[0.10, 0.50, 0.10, 0.10, 0.10, 0.10],
                      [0.30, 0.10, 0.30, 0.10, 0.10, 0.10]])
    first, second = torch.zeros(v), torch.zeros(v)
    for _ in range(n):
        if deterministic_draft:
            drafts = [1, 2]
            tokens, _ = verify(p, drafts, None, greedy=False, generator=g)
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
            tokens, _ = verify(p, drafts, q, greedy=False, generator=g)
        first[tokens[0]] += 1
        if len(tokens) > 1 and tokens[0] == drafts[0]:
            second[tokens[1]] += 1  # position 2 given position 1 accepted: follows p[1]
    assert _chi_square_ok(first, p[0])
    assert _chi_square_ok(second, p[1])
    # and the test has power: the draft's own distribution is rejected
    assert not _chi_square_ok(first, q[0]) and not _chi_square_ok(first, torch.full((v,), 1 / v))


def test_greedy_verify_accepts_exact_prefix():
    scores = torch.tensor([[0.0, 5.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert verify(scores, [1, 0], None, greedy=True) == ([1, 0, 2], 2)
    assert verify(scores, [1, 2], None, greedy=True) == ([1, 0], 1)
    assert verify(scores, [0, 0], None, greedy=True) == ([1], 0)


class RandomDraftProposer:
    """Draws k drafts from a fixed skewed distribution q, as a (bad) draft model would."""

    def __init__(self, q: torch.Tensor, seed: int = 0):
        self.q, self.g = q, torch.Generator().manual_seed(seed)

    def propose(self, batch):
        out = {}
        for req in batch:
            drafts = [int(torch.multinomial(self.q, 1, generator=self.g)) for _ in range(req.num_tokens)]
            out[req.request_id] = Proposal(drafts, self.q.repeat(len(drafts), 1))
        return out

    def release(self, request_id):
        pass


def test_sampling_with_speculation_matches_model_distribution(tmp_path):
    """A vocab-8 model: the second sampled token's frequencies with speculation match the
    model's exact marginal P(t2) = sum_t1 P(t1) P(t2 | t1)."""
    from tests.helpers.models import load_hf

    path = make_tiny_checkpoint(tmp_path, vocab_size=8, std=0.5, bos_token_id=0, eos_token_id=7)
    prompt = [0, 3, 5]
    hf = load_hf(path)
    with torch.no_grad():
        p1 = hf(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        nxt = torch.tensor([prompt + [t] for t in range(8)])
        p2_given = hf(nxt).logits[:, -1].softmax(-1)  # [8, 8]
    p2 = (p1[:, None] * p2_given).sum(0)
    eng = engine(path, num_blocks=600, max_num_seqs=256, max_num_batched_tokens=2048, num_speculative_tokens=1)
    q = torch.tensor([0.3, 0.02, 0.3, 0.02, 0.3, 0.02, 0.02, 0.02])
    eng.set_proposer(RandomDraftProposer(q))
    n = 1200
    outs = eng.generate([prompt] * n, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True))
    counts = torch.bincount(torch.tensor([o[1] for o in outs]), minlength=8).float()
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
    expected = p2 * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < 24.322, (counts, expected)  # chi-square, 7 degrees of freedom, significance 0.001


class WrongProposer:
    """Proposes tokens the target never picks (acceptance 0); counts its calls. Each call takes
    2 ms, as a draft model's would: with a free proposer on a tiny model, speculating with no
    acceptance costs about what plain decoding does, and the policy's choice is left to timing
    noise."""

    def __init__(self):
        self.calls = 0

    def propose(self, batch):
        import time

        self.calls += 1
        time.sleep(0.002)
        return {req.request_id: Proposal([3] * req.num_tokens) for req in batch}

    def release(self, request_id):
        pass


def test_adaptive_speculation_stops_proposing_when_nothing_is_accepted(ckpt):
    greedy = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    plain = engine(ckpt).generate(PROMPTS[:2], greedy)
    fixed, adaptive = engine(ckpt), engine(ckpt, adaptive_speculation=True)
    proposers = WrongProposer(), WrongProposer()
    fixed.set_proposer(proposers[0])
    adaptive.set_proposer(proposers[1])
    assert fixed.generate(PROMPTS[:2], greedy) == adaptive.generate(PROMPTS[:2], greedy) == plain
    assert proposers[0].calls >= 110  # one call per step (but the last ones, with room for one token)
    # the policy sees nothing accepted and, once its estimate has fallen, decodes plainly from
    # then on
    assert proposers[1].calls <= proposers[0].calls // 3, proposers[1].calls  # then a probe now and then
    assert adaptive.spec_policy.acceptance.value < 0.2
    # the engine counts the steps by the k chosen (tandem_spec_steps{k}): a proposer call per
    # speculating step; the fixed engine never at 0 (at its k, less only where max_tokens leaves less
    # room), the adaptive one mostly at 0
    by_k = fixed.stats().spec_steps_by_k
    assert sum(by_k) == proposers[0].calls and by_k[0] == 0
    assert by_k[fixed.config.num_speculative_tokens] >= proposers[0].calls - 4
    by_k = adaptive.stats().spec_steps_by_k
    assert sum(by_k[1:]) == proposers[1].calls and by_k[0] > 2 * proposers[1].calls


def test_a_requests_first_draft_call_is_not_taken_as_a_steps_draft_cost(ckpt):
    """The first call for a request has the draft compute its prompt: the policy must not take it
    for what every speculating step costs (it turned speculation off at concurrency 1)."""
    import time

    class SlowFirstProposer(NgramProposer):
        def __init__(self):
            super().__init__()
            self.seen: set[str] = set()

        def propose(self, batch):
            time.sleep(0.001 if {r.request_id for r in batch} <= self.seen else 0.2)
            self.seen |= {r.request_id for r in batch}
            return {r.request_id: Proposal([r.token_ids[-1]] * r.num_tokens) for r in batch}

    eng = engine(ckpt, num_speculative_tokens=2)
    eng.set_proposer(SlowFirstProposer())
    seen: list[float] = []
    observe = eng.spec_policy.observe_draft
    eng.spec_policy.observe_draft = lambda m, s: (seen.append(s), observe(m, s))
    for rid in ("a", "b"):  # two requests one after the other: the second's first call comes with a fit
        eng.add_request(rid, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
    # the very first call was taken (nothing else was measured yet), then only the 1 ms ones
    assert len(seen) > 3 and seen[0] >= 0.2
    assert all(s < 0.1 for s in seen[1:]), seen
