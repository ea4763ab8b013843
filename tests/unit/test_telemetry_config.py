"""TelemetryConfig.from_env: the standard OTEL_* names, Tandem's own, and clear errors."""

from __future__ import annotations

import pytest

from shared.telemetry import TelemetryConfig, build_tracer_provider


def test_defaults_with_an_empty_environment():
    config = TelemetryConfig.from_env({}, default_service_name="tandem-decode")
    assert config == TelemetryConfig(service_name="tandem-decode")
    assert config.otlp_endpoint is None and config.trace_file is None and config.metrics_port is None
    assert config.log_json is None and config.log_level == "info"


def test_standard_and_tandem_variables():
    config = TelemetryConfig.from_env(
        {
            "OTEL_SERVICE_NAME": "decode-1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci, host.name=gpu-3",
            "TANDEM_TRACE_FILE": "/tmp/spans.jsonl",
            "TANDEM_LOG_JSON": "false",
            "TANDEM_LOG_LEVEL": "DEBUG",
            "TANDEM_METRICS_PORT": "0",
            "TANDEM_GPU_HOUR_USD": "2.49",
            "TANDEM_NUM_GPUS": "0",
        },
        default_service_name="tandem-decode",
    )
    assert config.service_name == "decode-1"
    assert config.otlp_endpoint == "http://jaeger:4317"
    assert config.resource_attributes == {"deployment.environment": "ci", "host.name": "gpu-3"}
    assert config.trace_file == "/tmp/spans.jsonl"
    assert config.log_json is False and config.log_level == "debug"
    assert config.metrics_port == 0 and config.gpu_hour_usd == 2.49 and config.num_gpus == 0


def test_traces_specific_endpoint_wins_and_empty_means_unset():
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317",
    }
    assert TelemetryConfig.from_env(env, default_service_name="s").otlp_endpoint == "http://b:4317"
    empty = {"OTEL_EXPORTER_OTLP_ENDPOINT": "  ", "OTEL_SERVICE_NAME": ""}
    config = TelemetryConfig.from_env(empty, default_service_name="s")
    assert config.otlp_endpoint is None and config.service_name == "s"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TANDEM_METRICS_PORT", "http"),
        ("TANDEM_METRICS_PORT", "70000"),
        ("TANDEM_LOG_LEVEL", "loud"),
        ("TANDEM_LOG_JSON", "maybe"),
        ("TANDEM_GPU_HOUR_USD", "-1"),
        ("OTEL_RESOURCE_ATTRIBUTES", "novalue"),
    ],
)
def test_bad_values_name_their_variable(name, value):
    with pytest.raises(ValueError, match=name):
        TelemetryConfig.from_env({name: value}, default_service_name="s")


@pytest.fixture
def otlp_exporters(monkeypatch):
    """Records every OTLPSpanExporter built, instead of building it."""
    import opentelemetry.exporter.otlp.proto.grpc.trace_exporter as module

    built = []

    class Recorder:
        def __init__(self, **kwargs):
            built.append(kwargs)

        def export(self, spans):
            return None

        def shutdown(self):
            pass

        def force_flush(self, timeout_millis=30000):
            return True

    monkeypatch.setattr(module, "OTLPSpanExporter", Recorder)
    return built


def test_no_endpoint_no_exporter(otlp_exporters):
    build_tracer_provider(TelemetryConfig(service_name="s")).shutdown()
    assert otlp_exporters == []


@pytest.mark.parametrize(
    ("endpoint", "insecure"),
    [("http://jaeger:4317", True), ("jaeger:4317", True), ("https://otel.example:4317", False)],
)
def test_endpoint_scheme_decides_plaintext(otlp_exporters, endpoint, insecure):
    build_tracer_provider(TelemetryConfig(service_name="s", otlp_endpoint=endpoint)).shutdown()
    assert otlp_exporters == [{"endpoint": endpoint, "insecure": insecure}]


def test_the_metrics_server_binds_to_the_services_host_not_every_interface():
    from shared.config import telemetry_from_env
    from shared.telemetry import setup_telemetry

    assert TelemetryConfig(service_name="svc").metrics_host == "127.0.0.1"
    config = telemetry_from_env("tandem-decode", env={"TANDEM_METRICS_PORT": "0"}, host="127.0.0.1")
    assert config.metrics_host == "127.0.0.1"
    telemetry = setup_telemetry(config, set_global=False, configure_logs=False)
    try:
        assert telemetry.metrics._server.server_address[0] == "127.0.0.1"
    finally:
        telemetry.shutdown()
