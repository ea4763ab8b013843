"""Telemetry settings of one service, and how they are read from an environment mapping.

This module never touches `os.environ`: `shared/config.py` passes the mapping to
`TelemetryConfig.from_env`, so tests and in-process services can build their own.

Environment variables (standard OpenTelemetry names where one exists):

| variable | field | default |
|---|---|---|
| `OTEL_SERVICE_NAME` | `service_name` | the service's own default (`tandem-decode`, ...) |
| `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` | `otlp_endpoint` | unset: no OTLP exporter runs |
| `OTEL_EXPORTER_OTLP_INSECURE` | `otlp_insecure` | from the scheme: `https://` is TLS, anything else plaintext |
| `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k=v`) | `resource_attributes` | none |
| `TANDEM_TRACE_FILE` | `trace_file` | unset: no JSON-lines span file |
| `TANDEM_LOG_JSON` (`1/true`, `0/false`, `auto`) | `log_json` | auto: JSON unless stderr is a TTY |
| `TANDEM_LOG_LEVEL` | `log_level` | `info` |
| `TANDEM_METRICS_PORT` | `metrics_port` | unset: no metrics HTTP server; `0` picks a free port |
| `TANDEM_HOST` (the service's, passed in by `shared/config.py`) | `metrics_host` | `127.0.0.1` |
| `TANDEM_GPU_HOUR_USD` | `gpu_hour_usd` | unset: the price and cost gauges read NaN ("unset", not $0) |
| `TANDEM_NUM_GPUS` | `num_gpus` | `1` |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class TelemetryConfig:
    """What one service process exports, and where.

    service_name: `service.name` on every span, `service` on every log line.
    otlp_endpoint: OTLP/gRPC collector address (`http://jaeger:4317`); None: no exporter.
    otlp_insecure: plaintext gRPC to the collector; None: decided by the endpoint's scheme.
    trace_file: append finished spans as JSON lines here (read by `python -m tools.traces`).
    log_json: JSON log lines (True), console renderer (False), or by stderr being a TTY (None).
    log_level: lowest level logged, one of `LOG_LEVELS`.
    metrics_port: Prometheus HTTP port; 0 binds a free one; None: no metrics server.
    metrics_host: interface the metrics server binds to: the service's gRPC host (TANDEM_HOST).
    gpu_hour_usd: price of one GPU-hour, for the cost-per-million-tokens gauge; None: unset.
    num_gpus: GPUs this process holds (0 for the scheduler), for the same gauge.
    resource_attributes: extra OTel resource attributes (`deployment.environment`, ...).
    """

    service_name: str
    otlp_endpoint: str | None = None
    otlp_insecure: bool | None = None
    trace_file: str | None = None
    log_json: bool | None = None
    log_level: str = "info"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    gpu_hour_usd: float | None = None
    num_gpus: int = 1
    resource_attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("telemetry: service_name must not be empty (OTEL_SERVICE_NAME)")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(
                f"telemetry: log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)} "
                "(TANDEM_LOG_LEVEL)"
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(
                f"telemetry: metrics port {self.metrics_port} is out of range (TANDEM_METRICS_PORT)"
            )
        if self.gpu_hour_usd is not None and self.gpu_hour_usd < 0:
            raise ValueError(
                f"telemetry: GPU-hour price {self.gpu_hour_usd} is negative (TANDEM_GPU_HOUR_USD)"
            )
        if self.num_gpus < 0:
            raise ValueError(f"telemetry: GPU count {self.num_gpus} is negative (TANDEM_NUM_GPUS)")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, default_service_name: str, metrics_host: str = "127.0.0.1"
    ) -> TelemetryConfig:
        """Read the variables in the module docstring from `environ`; empty values count as unset."""

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        return cls(
            service_name=get("OTEL_SERVICE_NAME") or default_service_name,
            otlp_endpoint=get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            otlp_insecure=_parse_bool("OTEL_EXPORTER_OTLP_INSECURE", get("OTEL_EXPORTER_OTLP_INSECURE")),
            trace_file=get("TANDEM_TRACE_FILE"),
            log_json=_parse_bool("TANDEM_LOG_JSON", get("TANDEM_LOG_JSON")),
            log_level=(get("TANDEM_LOG_LEVEL") or "info").lower(),
            metrics_port=_parse_number("TANDEM_METRICS_PORT", get("TANDEM_METRICS_PORT"), int),
            metrics_host=metrics_host,
            gpu_hour_usd=_parse_number("TANDEM_GPU_HOUR_USD", get("TANDEM_GPU_HOUR_USD"), float),
            num_gpus=_or(_parse_number("TANDEM_NUM_GPUS", get("TANDEM_NUM_GPUS"), int), 1),
            resource_attributes=_parse_resource_attributes(get("OTEL_RESOURCE_ATTRIBUTES")),
        )


def _or(value, default):
    return default if value is None else value


def _parse_bool(name: str, value: str | None) -> bool | None:
    if value is None or value.lower() == "auto":
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"telemetry: {name}={value!r} is not a boolean (use 1/0, true/false or auto)")


def _parse_number(name: str, value: str | None, kind: type):
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"telemetry: {name}={value!r} is not a valid {kind.__name__}") from None


def _parse_resource_attributes(value: str | None) -> dict[str, str]:
    """`k1=v1,k2=v2` as in the OTel spec; malformed pairs are an error, not silently dropped."""
    if value is None:
        return {}
    attributes = {}
    for pair in value.split(","):
        if not pair.strip():
            continue
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"telemetry: OTEL_RESOURCE_ATTRIBUTES entry {pair!r} is not key=value")
        attributes[key.strip()] = val.strip()
    return attributes
