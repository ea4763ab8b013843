"""Observability for every Tandem service: traces (OpenTelemetry), logs (structlog), metrics (Prometheus).

A service calls `setup_telemetry(TelemetryConfig.from_env(environ, default_service_name=...))`
once at start-up, puts `telemetry.server_interceptors()` on its server and
`telemetry.client_interceptors()` on every channel it opens, and calls
`telemetry.shutdown()` on exit. Everything else is one-line calls at the sites that know
the numbers: `span(...)`/`annotate(...)`, `get_logger(...)`, `telemetry.metrics.*`.

Nothing here reads the environment or starts anything at import time, and importing
the package does not import grpc (the engine may use `span` and `get_logger`).
"""

import importlib

from shared.telemetry import attributes
from shared.telemetry.config import TelemetryConfig
from shared.telemetry.jsonl import JsonLinesSpanExporter, read_spans
from shared.telemetry.logs import bind_request_id, configure_logging, current_request_id, get_logger
from shared.telemetry.metrics import Metrics, start_metrics_server
from shared.telemetry.tracing import (
    RequestSpans,
    annotate,
    build_tracer_provider,
    current_trace_ids,
    extract_context,
    get_tracer,
    inject_context,
    span,
)

# The gRPC parts load on first use, so that the engine (which never imports grpc) can use
# `span`, `annotate` and `get_logger` from here.
_LAZY = {
    "REQUEST_ID_METADATA_KEY": "shared.telemetry.interceptors",
    "ServerTracingInterceptor": "shared.telemetry.interceptors",
    "client_interceptors": "shared.telemetry.interceptors",
    "server_interceptors": "shared.telemetry.interceptors",
    "Telemetry": "shared.telemetry.runtime",
    "setup_telemetry": "shared.telemetry.runtime",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REQUEST_ID_METADATA_KEY",
    "JsonLinesSpanExporter",
    "RequestSpans",
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
