"""Serving-benchmark arithmetic on hand-made timelines whose answers are known (vLLM's definitions)."""

from __future__ import annotations

import math

import pytest

from tools.bench.metrics import Timeline, compute_metrics, median_of_runs, metric_keys


def tl(send: float, chunks: list[tuple[float, int]], end: float | None = None, **kw) -> Timeline:
    t = Timeline(send=send, prompt_tokens=kw.pop("prompt_tokens", 10), **kw)
    for at, n in chunks:
        t.add_chunk(at, n)
    t.end = chunks[-1][0] if end is None and chunks else end
    return t


def test_one_request_ttft_tpot_itl_e2e():
    # sent at 1.0; tokens at 1.1, 1.15, 1.25: TTFT 100 ms, E2E 250 ms,
    # TPOT = (250 - 100) / (3 - 1) = 75 ms, ITL = 50 ms and 100 ms
    m = compute_metrics([tl(1.0, [(1.1, 1), (1.15, 1), (1.25, 1)])], duration_s=0.5)
    assert m["mean_ttft_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(250)
    assert m["mean_tpot_ms"] == pytest.approx(75)
    assert m["mean_itl_ms"] == pytest.approx(75)
    assert m["median_itl_ms"] == pytest.approx(75)
    assert m["p99_itl_ms"] == pytest.approx(50 + 0.99 * 50)
    assert m["total_output_tokens"] == 3 and m["total_input_tokens"] == 10
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(6.0)
    assert m["total_token_throughput"] == pytest.approx(26.0)


def test_multi_token_chunks_count_tokens_not_chunks():
    # a chunk of 3 tokens (speculation, batched detokenization): TPOT divides by tokens - 1,
    # ITL has one gap per chunk boundary, as vLLM counts them
    m = compute_metrics([tl(0.0, [(0.2, 1), (0.5, 3)])], duration_s=1.0)
    assert m["total_output_tokens"] == 4
    assert m["mean_tpot_ms"] == pytest.approx((500 - 200) / 3)
    assert m["mean_itl_ms"] == pytest.approx(300)


def test_usage_count_wins_over_chunk_count():
    t = tl(0.0, [(0.1, 1), (0.3, 1)], output_tokens=5)
    m = compute_metrics([t], duration_s=1.0)
    assert m["total_output_tokens"] == 5
    assert m["mean_tpot_ms"] == pytest.approx(200 / 4)


def test_single_token_request_has_no_tpot_but_meets_the_tpot_slo():
    one = tl(0.0, [(0.1, 1)])
    two = tl(0.0, [(0.1, 1), (0.6, 1)])  # TPOT 500 ms
    m = compute_metrics([one, two], duration_s=1.0, slo_tpot_ms=100)
    assert m["mean_tpot_ms"] == pytest.approx(500)  # only the two-token request has a TPOT
    assert m["request_goodput"] == pytest.approx(1.0)  # the one-token request is good (TPOT 0)
    assert m["goodput_fraction"] == pytest.approx(0.5)


def test_failed_requests_are_counted_but_measure_nothing():
    ok = tl(0.0, [(0.1, 1), (0.2, 1)])
    failed = tl(0.0, [(5.0, 1)], error="UNAVAILABLE: no healthy decode worker")
    no_token = Timeline(send=0.0, prompt_tokens=7, end=0.3)
    m = compute_metrics([ok, failed, no_token], duration_s=2.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (3, 1, 2)
    assert m["mean_ttft_ms"] == pytest.approx(100)
    assert m["total_input_tokens"] == 10
    assert m["request_throughput"] == pytest.approx(0.5)


def test_percentiles_interpolate_like_numpy():
    # TTFTs of 1..100 ms: p50 50.5, p90 90.1, p99 99.01 (linear interpolation)
    timelines = [tl(0.0, [(i / 1000, 1)]) for i in range(1, 101)]
    m = compute_metrics(timelines, duration_s=1.0)
    assert m["median_ttft_ms"] == pytest.approx(50.5)
    assert m["p90_ttft_ms"] == pytest.approx(90.1)
    assert m["p99_ttft_ms"] == pytest.approx(99.01)
    assert m["mean_ttft_ms"] == pytest.approx(50.5)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt((100**2 - 1) / 12))


def test_goodput_needs_every_slo():
    fast = tl(0.0, [(0.1, 1), (0.15, 1)])  # TTFT 100, TPOT 50
    slow_first = tl(0.0, [(0.9, 1), (0.95, 1)])  # TTFT 900, TPOT 50
    slow_rest = tl(0.0, [(0.1, 1), (0.5, 1)])  # TTFT 100, TPOT 400
    runs = [fast, slow_first, slow_rest]
    assert compute_metrics(runs, 2.0, slo_ttft_ms=500)["request_goodput"] == pytest.approx(1.0)
    assert compute_metrics(runs, 2.0, slo_tpot_ms=100)["request_goodput"] == pytest.approx(1.0)
    assert compute_metrics(runs, 2.0, slo_ttft_ms=500, slo_tpot_ms=100)["request_goodput"] == pytest.approx(
        0.5
    )
    assert compute_metrics(runs, 2.0)["request_goodput"] is None


def test_prefix_cache_ratio_from_usage():
    a = tl(0.0, [(0.1, 1)], prompt_tokens=100, cached_tokens=80)
    b = tl(0.0, [(0.1, 1)], prompt_tokens=100, cached_tokens=0)
    assert compute_metrics([a, b], 1.0)["prefix_cache_hit_ratio_client"] == pytest.approx(0.4)


def test_no_successful_request_gives_zeros_not_errors():
    m = compute_metrics([Timeline(send=0.0, prompt_tokens=3, error="x")], 1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0 and m["p99_itl_ms"] == 0
    assert set(m) == set(metric_keys())
    with pytest.raises(ValueError):
        compute_metrics([], 0.0)


def test_every_latency_has_mean_std_median_and_percentiles():
    keys = set(metric_keys())
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "std", "median", "p50", "p90", "p99"):
            assert f"{stat}_{name}_ms" in keys


def test_median_of_runs():
    runs = [{"a": 1.0, "b": None, "c": "x"}, {"a": 5.0, "b": 2.0, "c": "y"}, {"a": 2.0, "b": 3.0, "c": "z"}]
    assert median_of_runs(runs) == {"a": 2.0, "b": None, "c": "x"}
    assert median_of_runs([]) == {}
