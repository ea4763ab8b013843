"""Figures scraped from the services' /metrics: windowed deltas, and null (never 0) when absent."""

from __future__ import annotations

import time

import pytest

from shared.telemetry.metrics import Metrics
from tools.bench.scrape import SERVICE_FIGURE_KEYS, parse, scrape, scrape_all, service_figures
from tools.bench.topology import free_ports


def exposition(m: Metrics) -> dict:
    return parse(m.exposition().decode())


def test_parse_sums_labels_and_keeps_total_suffix():
    text = (
        "# TYPE tandem_kv_transfer_bytes counter\n"
        'tandem_kv_transfer_bytes_total{transport="grpc"} 10\n'
        'tandem_kv_transfer_bytes_total{transport="collective"} 5\n'
        "# TYPE tandem_queue_depth gauge\ntandem_queue_depth 3\n"
    )
    assert parse(text) == {
        "tandem_kv_transfer_bytes_total": 15.0,
        'tandem_kv_transfer_bytes_total{transport="grpc"}': 10.0,
        'tandem_kv_transfer_bytes_total{transport="collective"}': 5.0,
        "tandem_queue_depth": 3.0,
    }


def test_mean_k_is_weighted_by_the_steps_each_k_gained_over_the_run():
    decode, decode2 = Metrics("decode"), Metrics("decode")
    decode.record_spec_steps((), (0, 0, 0, 0, 10))  # before the run: ten steps at k = 4
    before = {"decode": exposition(decode), "decode2": exposition(decode2)}
    decode.record_spec_steps((0, 0, 0, 0, 10), (6, 0, 0, 0, 12))  # six plain steps, two at k = 4
    decode2.record_spec_steps((), (0, 0, 2))  # two at k = 2
    f = service_figures(before, {"decode": exposition(decode), "decode2": exposition(decode2)})
    assert f["spec_mean_k"] == pytest.approx((6 * 0 + 2 * 4 + 2 * 2) / 10)
    assert service_figures(before, before)["spec_mean_k"] is None  # no step: no mean


def test_figures_are_deltas_over_the_run():
    clock = [0.0]
    sched = Metrics("scheduler", gpu_hour_usd=2.0, num_gpus=0, clock=lambda: clock[0])
    decode = Metrics("decode", gpu_hour_usd=2.0, num_gpus=1, clock=lambda: clock[0])
    decode.record_prefix_cache(100, 10)  # warm-up traffic, before the run
    decode.generation_tokens.inc(50)
    sched.generation_tokens.inc(50)
    before = {"scheduler": exposition(sched), "decode": exposition(decode)}

    clock[0] = 3600.0  # one hour of one GPU at $2
    decode.record_prefix_cache(200, 150)
    decode.record_speculation(40, 30)
    decode.generation_tokens.inc(1_000_000)
    sched.generation_tokens.inc(1_000_000)
    after = {"scheduler": exposition(sched), "decode": exposition(decode)}

    f = service_figures(before, after)
    assert f["prefix_cache_hit_ratio"] == pytest.approx(0.75)
    assert f["spec_acceptance_rate"] == pytest.approx(0.75)
    assert (f["spec_proposed_tokens"], f["spec_accepted_tokens"]) == (40, 30)
    assert f["usd_per_million_generated_tokens"] == pytest.approx(2.0)
    assert f["gpu_hour_price_usd"] == 2.0
    assert f["metrics_endpoints_answering"] == ["decode", "scheduler"]
    assert set(f) == set(SERVICE_FIGURE_KEYS)


def test_scheduler_cpu_per_token_is_its_process_cpu_over_its_tokens():
    sched = Metrics("scheduler")
    before = {"scheduler": exposition(sched)}
    burnt = time.process_time()
    while time.process_time() - burnt < 0.05:  # spend some CPU in this process
        sum(range(1000))
    sched.generation_tokens.inc(100)
    after = {"scheduler": exposition(sched)}
    cpu_s = (
        after["scheduler"]["tandem_process_cpu_seconds"] - before["scheduler"]["tandem_process_cpu_seconds"]
    )
    f = service_figures(before, after)
    assert cpu_s >= 0.05
    assert f["scheduler_cpu_ms_per_token"] == pytest.approx(cpu_s * 1000 / 100)


def test_nothing_counted_is_null_not_zero():
    decode = Metrics("decode")
    snap = {"decode": exposition(decode)}
    f = service_figures(snap, snap)
    assert f["prefix_cache_hit_ratio"] is None  # no prompt token queried in the window
    assert f["spec_acceptance_rate"] is None
    assert f["usd_per_million_generated_tokens"] is None


def test_services_without_metrics_give_null():
    f = service_figures({"scheduler": None, "decode": None}, {"scheduler": None, "decode": None})
    assert f["metrics_endpoints_answering"] == []
    assert all(f[k] is None for k in SERVICE_FIGURE_KEYS if k != "metrics_endpoints_answering")


def test_scrape_over_http_and_a_closed_port():
    m = Metrics("decode")
    port = m.start_server(0, "127.0.0.1")
    try:
        m.record_prefix_cache(10, 4)
        got = scrape(f"http://127.0.0.1:{port}/metrics")
        assert got["tandem_prefix_cache_hit_tokens_total"] == 4
    finally:
        m.close()
    (closed,) = free_ports(1)
    assert scrape_all({"x": f"http://127.0.0.1:{closed}/metrics"}) == {"x": None}
