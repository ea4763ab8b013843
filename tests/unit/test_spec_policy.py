"""The speculation policy (shared/engine/spec_policy.py): Leviathan et al.'s expected tokens per
step, the cost lines it fits, and the k it picks: the configured k at batch 1 with a cheap draft
and good acceptance, 0 in a large batch or at low acceptance."""

from __future__ import annotations

import pytest

from shared.engine.spec_policy import (
    MARGIN,
    PROBE_EVERY,
    SpecPolicy,
    StepCostFit,
    best_k,
    expected_tokens,
    leviathan_speedup,
)


def test_expected_tokens_is_leviathans_formula():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.5, 4) == pytest.approx((1 - 0.5**5) / 0.5)
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.0, 4) == 1.0
    # speedup E(k) / (1 + k c): Leviathan et al.'s example, a = 0.8, c = 0.05, k = 4 -> ~2.8x
    assert leviathan_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / 0.2 / 1.2)


def test_cost_fit_recovers_a_line_and_keeps_its_slope_without_spread():
    fit = StepCostFit()
    for n in [1, 5, 24, 120, 512, 3, 64] * 5:
        fit.add(n, 0.007 + 0.0008 * n)
    t0, t1 = fit.coefficients()
    assert t0 == pytest.approx(0.007, rel=1e-6) and t1 == pytest.approx(0.0008, rel=1e-6)
    for _ in range(500):  # only one token count for a long time: the slope stays the last fitted
        fit.add(120, 0.007 + 0.0008 * 120)
    assert fit.coefficients()[1] == pytest.approx(0.0008, rel=1e-3)
    assert fit(24) == pytest.approx(0.007 + 0.0008 * 24, rel=1e-3)


def flat(seconds):  # a batch-1 target pass: the same cost for 1 to 5 tokens
    return lambda n: seconds


def line(t0, t1):
    return lambda n: t0 + t1 * n


def test_batch_one_with_a_cheap_draft_speculates():
    # a = 0.8, c = 0.05: every k up to 4 pays; the largest wins
    assert best_k(0.8, 4, line(0.0, 0.00035), flat(0.007), num_seqs=1) == 4
    # acceptance 46%, draft 10% of a target step: 2 drafts are best (more rarely survive)
    assert best_k(0.46, 4, line(0.0, 0.0007), line(0.007, 0.00015), num_seqs=1) == 2


def test_a_large_batch_turns_speculation_off():
    # the target pass grows with its tokens: verifying k + 1 per sequence costs more than it yields
    assert best_k(0.46, 4, line(0.001, 0.0002), line(0.007, 0.0008), num_seqs=24) == 0
    assert best_k(0.46, 4, line(0.001, 0.0002), line(0.007, 0.0008), num_seqs=1) > 0


def test_low_acceptance_turns_speculation_off():
    assert best_k(0.02, 4, line(0.0, 0.0007), flat(0.007), num_seqs=1) == 0


def fed(policy: SpecPolicy, *, target, draft, acceptance: float, rounds: int = 60) -> SpecPolicy:
    """Feeds a policy the measurements of a machine with these costs and this acceptance."""
    for i in range(rounds):
        for n in (1, 3, 5, 24, 48, 120, 256):
            policy.observe_step(n, target(n))
        for m in (1, 2, 4, 24, 96):
            policy.observe_draft(m, draft(m))
        accepted = 4 if i % 10 < acceptance * 10 else 0  # crude, but averages to `acceptance`
        policy.observe_verify(4, accepted)
    return policy


def test_policy_speculates_until_it_has_measured():
    policy = SpecPolicy()
    assert policy.choose_k(4, 32) == 4  # nothing measured: speculate, to measure
    assert SpecPolicy(adaptive=False).choose_k(3, 64) == 3


def test_policy_picks_k_from_what_it_measured():
    cpu = dict(target=line(0.007, 0.0008), draft=line(0.001, 0.0002))
    policy = fed(SpecPolicy(), acceptance=0.9, **cpu)
    assert policy.choose_k(4, 1) >= 2  # batch 1: speculate
    assert policy.choose_k(4, 32) == 0  # saturation: off
    assert policy.choose_k(0, 1) == 0  # the request asked for none
    low = fed(SpecPolicy(), acceptance=0.0, **cpu)
    assert low.choose_k(4, 1) == 0
    fixed = fed(SpecPolicy(adaptive=False), acceptance=0.0, **cpu)
    assert fixed.choose_k(4, 32) == 4


def test_acceptance_estimate_counts_the_first_rejection_as_a_failure():
    policy = SpecPolicy()
    for _ in range(300):
        policy.observe_verify(4, 1)  # one success, one failure
    assert policy.acceptance.value == pytest.approx(0.5, abs=0.01)
    for _ in range(300):
        policy.observe_verify(4, 4)  # all accepted: no failure seen
    assert policy.acceptance.value > 0.95


def test_turned_off_it_probes_now_and_then_and_resumes_when_acceptance_returns():
    cpu = dict(target=line(0.007, 0.0008), draft=line(0.001, 0.0002))
    policy = fed(SpecPolicy(), acceptance=0.0, **cpu)
    ks = [policy.choose_k(4, 1) for _ in range(PROBE_EVERY * 4)]
    assert ks.count(4) == 4 and ks.count(0) == len(ks) - 4  # one probe per PROBE_EVERY steps at batch 1
    big = [policy.choose_k(4, 16) for _ in range(PROBE_EVERY * 16)]
    assert big.count(4) == 1  # rarer in a large batch, where a probe costs more
    # the text changes: the probes see every draft accepted, and speculation resumes
    ks = []
    for _ in range(10 * PROBE_EVERY):
        ks.append(policy.choose_k(4, 1))
        if ks[-1]:
            policy.observe_verify(4, 4)
        if ks[-2:] == [4, 4] or len(ks) > 1 and ks[-1] and ks[-2]:
            break
    assert len(ks) > 1 and ks[-1] > 0 and ks[-2] > 0, ks  # two speculating steps in a row: not a probe


def test_a_steps_fixed_overhead_makes_more_drafts_pay():
    # what a step costs besides the two passes is paid once per step whatever k: the more tokens
    # a step yields, the less of it each token carries
    draft, target = line(0.0015, 0.0006), line(0.007, 0.0003)
    assert best_k(0.6, 4, draft, target, num_seqs=1) == 3
    assert best_k(0.6, 4, draft, target, num_seqs=1, overhead_s=0.005) == 4
    assert best_k(0.2, 4, draft, target, num_seqs=1) == 0
    assert best_k(0.2, 4, draft, target, num_seqs=1, overhead_s=0.02) > 0


def test_policy_uses_the_overhead_it_measured():
    cpu = dict(target=line(0.007, 0.0003), draft=line(0.0015, 0.0006))
    plain = fed(SpecPolicy(), acceptance=0.6, **cpu)
    busy = fed(SpecPolicy(), acceptance=0.6, **cpu)
    for _ in range(100):
        busy.observe_overhead(1, 0.005)
    plain.acceptance.value = busy.acceptance.value = 0.6
    assert busy.overhead(1) == pytest.approx(0.005)
    assert busy.choose_k(4, 1) > plain.choose_k(4, 1)


def test_each_sequence_counts_with_its_own_acceptance():
    draft, target = line(0.0015, 0.0006), line(0.007, 0.0003)
    # one well-guessed sequence beside a badly guessed one: the sum of their own E(k)
    mixed = best_k([0.9, 0.05], 4, draft, target, num_seqs=2)
    assert mixed == best_k([0.05, 0.9], 4, draft, target, num_seqs=2) > 0
    assert best_k([0.05, 0.05], 4, draft, target, num_seqs=2) == 0
    assert best_k([0.6], 4, draft, target, num_seqs=1) == best_k(0.6, 4, draft, target, num_seqs=1)


def test_a_request_of_well_guessed_text_is_not_held_back_by_the_engines_history():
    """After a long stretch of badly guessed text the engine-wide estimate is low; a new request
    starts from it, but its own first verifications decide."""
    cpu = dict(target=line(0.007, 0.0003), draft=line(0.0015, 0.0006))
    policy = fed(SpecPolicy(), acceptance=0.0, **cpu)
    for _ in range(200):
        policy.observe_verify(4, 0)  # the saturated batch of prose: nothing accepted
    assert policy.choose_k(4, 1) == 0 or policy.last_k == 4  # off (or a probe)
    mine = policy.request_acceptance()
    assert mine.value == pytest.approx(policy.acceptance.value)
    for accepted in (4, 3, 4):  # three probes of this request: nearly every draft accepted
        policy.observe_verify(4, accepted, mine)
    assert mine.value > 0.55 and policy.acceptance.value < 0.25
    assert policy.choose_k(4, 1, acceptances=[mine.value]) > 0
    assert policy.choose_k(4, 1) == 0 or policy.last_k == 4  # the engine-wide estimate alone: still off


def test_near_break_even_it_keeps_doing_what_it_does():
    """Hysteresis: up to MARGIN better than plain decoding the policy does not switch either way."""
    draft, target = line(0.0015, 0.0006), line(0.007, 0.0003)
    a = 0.3
    while best_k(a, 4, draft, target, 1, margin=0.0) == 0:  # just past break-even
        a += 0.005
    assert best_k(a, 4, draft, target, 1, margin=0.0) > 0  # speculating: stays on
    assert best_k(a, 4, draft, target, 1, margin=MARGIN) == 0  # plain: stays plain
    policy = fed(SpecPolicy(), target=target, draft=draft, acceptance=0.9)
    assert policy.choose_k(4, 1, acceptances=[a]) > 0  # it was speculating
    assert policy.choose_k(4, 1, acceptances=[0.05]) == 0  # clearly worse: off
    assert policy.choose_k(4, 1, acceptances=[a]) == 0  # back near break-even: stays off


def test_a_request_is_planned_with_its_estimate_plus_one_standard_error():
    policy = SpecPolicy()
    policy.acceptance.value = 0.4
    new = policy.planning_acceptance(None)  # no verification yet: the engine-wide value, uncertain
    assert new == pytest.approx(0.4 + (0.4 * 0.6 / 8) ** 0.5)
    mine = policy.request_acceptance()
    bonuses = []
    for _ in range(6):
        for _ in range(10):
            policy.observe_verify(4, 1, mine)  # one success, one failure: 0.5
        bonuses.append(policy.planning_acceptance(mine) - mine.value)
    assert all(b > 0 for b in bonuses) and bonuses == sorted(bonuses, reverse=True)  # shrinks with data
    assert bonuses[-1] < 0.05 and mine.value == pytest.approx(0.5, abs=0.02)
    sure = policy.request_acceptance()
    for _ in range(20):
        policy.observe_verify(4, 4, sure)
    assert policy.planning_acceptance(sure) <= 1.0
