"""Prometheus metrics: scraped over HTTP as Prometheus would, one registry per service."""

from __future__ import annotations

import math
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.telemetry import Metrics, TelemetryConfig, setup_telemetry, start_metrics_server


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_observations_show_up_on_the_metrics_endpoint():
    metrics = Metrics("decode", gpu_hour_usd=2.5, num_gpus=1)
    port = start_metrics_server(metrics, 0, addr="127.0.0.1")
    try:
        assert port > 0
        metrics.ttft_seconds.observe(0.04)
        metrics.ttft_seconds.observe(0.6)
        metrics.inter_token_latency_seconds.observe(0.012)
        metrics.e2e_latency_seconds.observe(3.0)
        metrics.queue_time_seconds.observe(0.002)
        metrics.queue_depth.set(3)
        metrics.running_sequences.set(7)
        metrics.set_kv_blocks(used=64, total=256)
        metrics.record_prefix_cache(queried_tokens=1000, hit_tokens=750)
        metrics.preemptions.inc()
        metrics.prompt_tokens.inc(1000)
        metrics.generation_tokens.inc(120)
        metrics.record_speculation(proposed=40, accepted=30)
        metrics.record_kv_transfer("grpc", 4096, 0.002)
        metrics.record_kv_transfer("collective", 1 << 20, 0.001)

        samples = _scrape(port)
    finally:
        metrics.close()

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert all(name.startswith("tandem_") for name, _ in samples)
    assert value("tandem_service_info", service="decode") == 1
    assert value("tandem_time_to_first_token_seconds_count") == 2
    assert value("tandem_time_to_first_token_seconds_sum") == pytest.approx(0.64)
    assert value("tandem_time_to_first_token_seconds_bucket", le="0.05") == 1
    assert value("tandem_inter_token_latency_seconds_count") == 1
    assert value("tandem_e2e_request_latency_seconds_count") == 1
    assert value("tandem_request_queue_time_seconds_count") == 1
    assert value("tandem_queue_depth") == 3
    assert value("tandem_running_sequences") == 7
    assert value("tandem_kv_blocks_used") == 64
    assert value("tandem_kv_blocks_total") == 256
    assert value("tandem_kv_block_usage_ratio") == 0.25
    assert value("tandem_prefix_cache_hit_ratio") == 0.75
    assert value("tandem_preemptions_total") == 1
    assert value("tandem_prompt_tokens_total") == 1000
    assert value("tandem_generation_tokens_total") == 120
    assert value("tandem_spec_proposed_tokens_total") == 40
    assert value("tandem_spec_accepted_tokens_total") == 30
    assert value("tandem_kv_transfer_bytes_total", transport="grpc") == 4096
    assert value("tandem_kv_transfer_bytes_total", transport="collective") == 1 << 20
    assert value("tandem_kv_transfer_seconds_total", transport="grpc") == pytest.approx(0.002)
    assert value("tandem_gpu_hour_price_usd") == 2.5
    assert value("tandem_estimated_cost_usd_per_million_generated_tokens") > 0


def test_two_services_in_one_process_keep_separate_registries():
    scheduler, decode = Metrics("scheduler"), Metrics("decode")  # would raise on a shared registry
    decode.generation_tokens.inc(5)
    scheduler_text = scheduler.exposition().decode()
    decode_text = decode.exposition().decode()
    assert "tandem_generation_tokens_total 0.0" in scheduler_text
    assert "tandem_generation_tokens_total 5.0" in decode_text
    assert 'service="scheduler"' in scheduler_text and 'service="decode"' not in scheduler_text


def test_cost_per_million_tokens_follows_the_documented_formula():
    # cost = uptime_h * gpus * price; per million = cost / generated * 1e6
    clock = _Clock()
    metrics = Metrics("decode", gpu_hour_usd=2.0, num_gpus=2, clock=clock)
    assert math.isnan(metrics.cost_per_million_tokens())  # no token yet
    clock.now += 1800  # half an hour on 2 GPUs at $2: $2
    metrics.generation_tokens.inc(500_000)
    assert metrics.gpu_cost_usd() == pytest.approx(2.0)
    assert metrics.cost_per_million_tokens() == pytest.approx(4.0)
    clock.now += 1800  # another $2, no more tokens: the figure doubles
    assert metrics.cost_per_million_tokens() == pytest.approx(8.0)

    text = metrics.exposition().decode()
    assert "tandem_estimated_cost_usd_per_million_generated_tokens 8.0" in text
    assert "tandem_gpu_cost_usd 4.0" in text

    no_gpu = Metrics("scheduler", gpu_hour_usd=2.0, num_gpus=0, clock=clock)
    no_gpu.generation_tokens.inc(10)
    clock.now += 3600
    assert no_gpu.cost_per_million_tokens() == 0.0


def test_an_unset_price_reads_unset_not_zero():
    clock = _Clock()
    metrics = Metrics("decode", num_gpus=1, clock=clock)  # TANDEM_GPU_HOUR_USD unset
    metrics.generation_tokens.inc(1000)
    clock.now += 3600
    assert math.isnan(metrics.gpu_cost_usd()) and math.isnan(metrics.cost_per_million_tokens())
    text = metrics.exposition().decode()
    assert "tandem_gpu_hour_price_usd NaN" in text
    assert "tandem_estimated_cost_usd_per_million_generated_tokens NaN" in text
    assert "NaN: unset" in text  # the HELP line says what NaN means
    free = Metrics("decode", gpu_hour_usd=0.0, num_gpus=1, clock=clock)  # a price of 0 is a price
    free.generation_tokens.inc(1000)
    assert free.cost_per_million_tokens() == 0.0


def test_setup_telemetry_serves_metrics_on_the_configured_port_until_shutdown():
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="prefill", metrics_port=0), set_global=False, configure_logs=False
    )
    port = telemetry.metrics_port
    telemetry.metrics.prompt_tokens.inc(9)
    assert _scrape(port)[("tandem_prompt_tokens_total", ())] == 9
    telemetry.shutdown()
    with pytest.raises(urllib.error.URLError):
        _scrape(port)
