"""`make bench-spec`'s arithmetic (tools/bench/spec.py): the acceptance solved from a fixed-k run,
Leviathan et al.'s prediction from the in-process step costs and from the draft's cost as served."""

from __future__ import annotations

import pytest

from shared.engine.spec_policy import expected_tokens, leviathan_speedup
from tools.bench.spec import markdown, solve_acceptance, summarize


def _serve_result(tpot: dict, draft_s_per_proposed: float) -> dict:
    def entry(system):
        c1 = {"median_tpot_ms": tpot[system], "mean_tpot_ms": tpot[system] * 1.1, "output_throughput": 1000 / tpot[system],
              "spec_acceptance_rate": None if system == "agg" else 0.46,
              "spec_draft_s_per_proposed": None if system == "agg" else draft_s_per_proposed,
              "spec_mean_k": None if system == "agg" else 3.25}
        mixed = {"median_tpot_ms": 40.0, "output_throughput": 300.0, "spec_acceptance_rate": None,
                 "spec_mean_k": None if system == "agg" else 0.5}
        return {"results": {"c1": {"median": c1}, "mixed": {"median": mixed}}}

    return {"systems": {s: entry(s) for s in tpot}, "machine": {"label": "test"}}


def test_acceptance_is_solved_from_accepted_per_proposed():
    a = solve_acceptance(0.46, 4)
    assert (expected_tokens(a, 4) - 1) / 4 == pytest.approx(0.46, abs=1e-9)


def test_prediction_from_in_process_and_from_served_costs():
    result = _serve_result({"agg": 10.0, "agg-spec": 7.0, "agg-spec-fixed": 7.5}, draft_s_per_proposed=0.0015)
    costs = {"target_step_ms": 9.0, "draft_step_ms": 0.9, "c": 0.1}
    s = summarize(result, costs, 4)
    f = s["formula"]
    a = solve_acceptance(0.46, 4)
    assert f["speedup_at_k"] == pytest.approx(leviathan_speedup(a, 4, 0.1))
    assert f["c_served"] == pytest.approx(1.5 / 10.0)  # 1.5 ms of draft call per token over a 10 ms plain step
    assert f["speedup_at_k_served"] == pytest.approx(leviathan_speedup(a, 4, 0.15))
    assert s["ratios"]["agg-spec"]["c1_tpot_speedup"] == pytest.approx(10 / 7)
    assert s["ratios"]["agg-spec"]["c1_mean_tpot_speedup"] == pytest.approx(11 / 7.7)
    text = markdown({**s, "command": "x", "wall_s": 1})
    assert "c = 0.150" in text and "as served" in text
    assert "| 3.25 / 0.50 |" in text  # the k the policy chose, at c1 and at saturation
    assert "| TPOT speedup at concurrency 1, mean over the requests | 1.43x |" in text


def test_the_in_worker_draft_gets_its_own_column_and_ratio_to_the_formula():
    result = _serve_result({"agg": 10.0, "agg-spec": 7.0, "agg-spec-fixed": 7.5, "agg-spec-local": 5.0},
                           draft_s_per_proposed=0.0015)
    costs = {"target_step_ms": 9.0, "draft_step_ms": 0.9, "c": 0.1}
    s = summarize(result, costs, 4)
    assert s["ratios"]["agg-spec-local"]["c1_tpot_speedup"] == pytest.approx(2.0)
    text = markdown({**s, "command": "x", "wall_s": 1})
    assert "draft in the decode worker" in text
    best = s["formula"]["speedup_at_best_k"]
    assert f"draft in the decode worker {2.0 / best:.2f}" in text
    assert f"draft service {(10 / 7) / best:.2f}" in text


def test_a_run_without_the_in_worker_draft_reports_it_missing():
    s = summarize(_serve_result({"agg": 10.0, "agg-spec": 7.0, "agg-spec-fixed": 7.5}, 0.0015),
                  {"target_step_ms": 9.0, "draft_step_ms": 0.9, "c": 0.1}, 4)
    assert s["ratios"]["agg-spec-local"]["c1_tpot_speedup"] is None
    assert "draft in the decode worker n/a" in markdown({**s, "command": "x", "wall_s": 1})


def test_step_costs_before_and_after_the_runs_are_averaged_and_both_reported():
    from tools.bench.spec import mean_costs

    costs = mean_costs({"target_step_ms": 8.0, "draft_step_ms": 0.6, "c": 0.075},
                       {"target_step_ms": 12.0, "draft_step_ms": 1.0, "c": 1 / 12})
    assert (costs["target_step_ms"], costs["draft_step_ms"]) == (10.0, 0.8)
    assert costs["c"] == pytest.approx(0.08)
    s = summarize(_serve_result({"agg": 10.0, "agg-spec": 7.0, "agg-spec-fixed": 7.5}, 0.0015), costs, 4)
    text = markdown({**s, "command": "x", "wall_s": 1})
    assert "c = 0.080 (before the runs: 8.00 / 0.60 ms) (after: 12.00 / 1.00 ms)" in text
    assert mean_costs({"target_step_ms": 8.0, "draft_step_ms": None, "c": None})["c"] is None
