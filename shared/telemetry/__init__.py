"""Observability for every Tandem service: traces (OpenTelemetry), logs (structlog), metrics (Prometheus).

A service calls `setup_telemetry(TelemetryConfig.from_env(environ, default_service_name=...))`
once at start-up, puts `telemetry.server_interceptors()` on its server and
`telemetry.client_interceptors()` on every channel it opens, and calls
`telemetry.shutdown()` on exit. Everything else is one-line calls at the sites that know
the numbers: `span(...)`/`annotate(...)`, `get_logger(...)`, `telemetry.metrics.*`.

Nothing here reads the environment or starts anything at import time.
"""

from shared.telemetry import attributes
from shared.telemetry.config import TelemetryConfig
from shared.telemetry.interceptors import (
    REQUEST_ID_METADATA_KEY,
    ServerTracingInterceptor,
    client_interceptors,
    server_interceptors,
)
from shared.telemetry.jsonl import JsonLinesSpanExporter, read_spans
from shared.telemetry.logs import bind_request_id, configure_logging, current_request_id, get_logger
from shared.telemetry.metrics import Metrics, start_metrics_server
from shared.telemetry.runtime import Telemetry, setup_telemetry
from shared.telemetry.tracing import (
    annotate,
    build_tracer_provider,
    current_trace_ids,
    extract_context,
    get_tracer,
    inject_context,
    span,
)

__all__ = [
    "REQUEST_ID_METADATA_KEY",
    "JsonLinesSpanExporter",
    "Metrics",
    "ServerTracingInterceptor",
    "Telemetry",
    "TelemetryConfig",
    "annotate",
    "attributes",
    "bind_request_id",
    "build_tracer_provider",
    "client_interceptors",
    "configure_logging",
    "current_request_id",
    "current_trace_ids",
    "extract_context",
    "get_logger",
    "get_tracer",
    "inject_context",
    "read_spans",
    "server_interceptors",
    "setup_telemetry",
    "span",
    "start_metrics_server",
]
