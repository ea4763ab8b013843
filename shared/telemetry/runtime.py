"""One call that wires tracing, logging and metrics for a service, and one that undoes it.

In a service's `__main__`: `telemetry = setup_telemetry(config.telemetry)`, then
`grpc.aio.server(interceptors=telemetry.server_interceptors())`, every channel opened with
`grpc.aio.insecure_channel(peer, interceptors=telemetry.client_interceptors())`, and
`telemetry.shutdown()` on every exit path: it flushes the batched spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from shared.telemetry.config import TelemetryConfig
from shared.telemetry.interceptors import client_interceptors, server_interceptors
from shared.telemetry.logs import configure_logging
from shared.telemetry.metrics import Metrics
from shared.telemetry.tracing import RequestSpans, build_tracer_provider, get_tracer
from shared.telemetry.tracing import span as _span


@dataclass
class Telemetry:
    """What `setup_telemetry` built for one service."""

    config: TelemetryConfig
    tracer_provider: TracerProvider
    tracer: trace.Tracer
    metrics: Metrics
    metrics_port: int | None  # bound port of the metrics server, None when none runs
    request_spans: RequestSpans = field(default_factory=RequestSpans)  # see RequestSpans
    _closed: bool = field(default=False, init=False, repr=False)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return server_interceptors(self.tracer_provider)

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return client_interceptors(self.tracer_provider)

    def span(self, name: str, **attrs: Any):
        """`shared.telemetry.span` with this service's tracer (and so its service.name)."""
        return _span(name, tracer=self.tracer, **attrs)

    def shutdown(self, timeout_millis: int = 10_000) -> None:
        """Export every span still buffered, stop the exporters and the metrics server.

        Blocking (up to `timeout_millis` when the collector is unreachable): from a running
        event loop, `await asyncio.to_thread(telemetry.shutdown)`. A second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self.tracer_provider.force_flush(timeout_millis)
        self.tracer_provider.shutdown()
        self.metrics.close()


def setup_telemetry(
    config: TelemetryConfig,
    *,
    set_global: bool = True,
    configure_logs: bool = True,
    span_processors: Sequence[SpanProcessor] = (),
) -> Telemetry:
    """Build this service's tracer provider, logging and metrics from `config`.

    set_global: install the provider as OpenTelemetry's global one, so `span(...)` without
      a tracer and third-party instrumentation use it. OpenTelemetry allows that once per
      process; services running side by side in one test process pass False and use
      `Telemetry.span` / the interceptors, which are bound to their own provider.
    configure_logs: configure structlog for the process (once per process as well).
    span_processors: extra processors, e.g. a SimpleSpanProcessor(InMemorySpanExporter()).
    """
    provider = build_tracer_provider(config, span_processors)
    if set_global:
        trace.set_tracer_provider(provider)
    if configure_logs:
        configure_logging(config.service_name, json=config.log_json, level=config.log_level)
    metrics = Metrics(config.service_name, gpu_hour_usd=config.gpu_hour_usd, num_gpus=config.num_gpus)
    port = (
        metrics.start_server(config.metrics_port, config.metrics_host)
        if config.metrics_port is not None
        else None
    )
    return Telemetry(config, provider, get_tracer(provider), metrics, port)
