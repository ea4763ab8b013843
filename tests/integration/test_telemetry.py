"""One Generate is one trace across scheduler -> decode -> prefill, and the services count it."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import TelemetryConfig, setup_telemetry

from .cluster import start_cluster, token_ids

PROMPT = [1, *range(20, 60)]


@pytest.mark.parametrize("transport", ["grpc", "collective"])
async def test_one_trace_across_the_services(tiny_model, transport):
    exporter = InMemorySpanExporter()
    made = {}

    def telemetry(name):
        made[name] = setup_telemetry(
            TelemetryConfig(service_name=name),
            set_global=False,
            configure_logs=False,
            span_processors=[SimpleSpanProcessor(exporter)],
        )
        return made[name]

    cluster = await start_cluster(tiny_model, transport=transport, telemetry=telemetry)
    try:
        responses = await cluster.generate(prompt=PROMPT, max_tokens=5)
        assert len(token_ids(responses)) == 5
        await cluster.wait_idle()
    finally:
        await cluster.stop()
    spans = exporter.get_finished_spans()
    by_name = {(s.name, s.resource.attributes["service.name"]): s for s in spans}
    expected = {
        ("tandem.v1.Tandem/Generate", "tandem-scheduler"),  # server
        ("generate", "tandem-scheduler"),
        ("route", "tandem-scheduler"),
        ("tandem.v1.Decode/Generate", "tandem-scheduler"),  # client
        ("tandem.v1.Decode/Generate", "tandem-decode"),  # server
        ("kv_transfer", "tandem-decode"),
        ("decode", "tandem-decode"),
        ("tandem.v1.Prefill/Prefill", "tandem-decode"),
        ("tandem.v1.Prefill/Prefill", "tandem-prefill"),
        ("prefill", "tandem-prefill"),
        ("kv_transfer", "tandem-prefill"),
    }
    assert expected <= set(by_name), sorted(by_name)
    assert len({by_name[key].context.trace_id for key in expected}) == 1
    route = by_name["route", "tandem-scheduler"].attributes
    assert (
        route["tandem.disaggregated"] is True
        and route["tandem.prefill_worker"] == cluster.prefills[0].address
    )
    receive = next(
        s
        for s in spans
        if s.name == "kv_transfer" and s.resource.attributes["service.name"] == "tandem-decode"
    )
    assert receive.attributes["tandem.kv_transport"] == transport
    assert (
        receive.attributes["tandem.kv_bytes"] == 2 * 2 * len(PROMPT) * 2 * 16 * 4
    )  # L * kv * T * Hkv * D * fp32
    assert by_name["prefill", "tandem-prefill"].attributes["tandem.prompt_tokens"] == len(PROMPT)
    # the counters behind the cost figure
    assert made["tandem-decode"].metrics.generation_tokens._value.get() == 5
    assert made["tandem-prefill"].metrics.prompt_tokens._value.get() == len(PROMPT)
