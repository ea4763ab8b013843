"""OpenTelemetry tracing: the tracer provider of a service, in-process spans, W3C propagation.

Spans leave the process through span processors chosen by `TelemetryConfig`: OTLP/gRPC
(batched) when an endpoint is set, a JSON-lines file when `trace_file` is set, both, or
neither (spans are then created for context propagation and log correlation only).
This module knows nothing about gRPC; `interceptors.py` carries the context across hops.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.telemetry.attributes import tandem_attribute
from shared.telemetry.config import TelemetryConfig
from shared.telemetry.jsonl import JsonLinesSpanExporter

TRACER_NAME = "tandem"

# W3C trace context (`traceparent`, `tracestate`) plus W3C baggage. Built here rather than
# taken from `opentelemetry.propagate`, which reads OTEL_PROPAGATORS when imported.
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def build_tracer_provider(
    config: TelemetryConfig, extra_processors: Sequence[SpanProcessor] = ()
) -> TracerProvider:
    """A provider with this service's resource and the exporters `config` asks for."""
    resource = Resource({**config.resource_attributes, SERVICE_NAME: config.service_name})
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    if config.otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config)))
    if config.trace_file:
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(config.trace_file)))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider


def _otlp_exporter(config: TelemetryConfig):
    # Imported lazily: the gRPC exporter pulls in protobuf stubs that a service without an
    # endpoint never needs.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    insecure = config.otlp_insecure
    if insecure is None:
        insecure = urlparse(config.otlp_endpoint).scheme != "https"
    return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=insecure)


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The Tandem tracer of `provider`, or of the global provider (looked up at call time)."""
    if provider is None:
        return trace.get_tracer(TRACER_NAME)
    return provider.get_tracer(TRACER_NAME)


def span_attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword attributes -> OTel attributes: `tandem.` prefix, None values dropped."""
    return {tandem_attribute(key): value for key, value in attrs.items() if value is not None}


@contextmanager
def span(
    name: str,
    *,
    tracer: trace.Tracer | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    parent: SpanContext | None = None,
    links: Iterable[Link] = (),
    **attrs: Any,
) -> Iterator[trace.Span]:
    """An in-process span, current for the body: `with span("route", request_id=rid) as s:`.

    Keywords become `tandem.<key>` attributes (see `attributes.py`). The span's parent is
    the current span, or `parent` when given (work done for a request outside its own task);
    `links` point at other spans it relates to. An exception leaving the body is recorded on
    the span and marks it ERROR, then propagates.
    """
    current = start_span(name, tracer=tracer, kind=kind, parent=parent, links=links, **attrs)
    token = otel_context.attach(trace.set_span_in_context(current))
    try:
        yield current
    except Exception as exc:  # errors only: GeneratorExit and CancelledError are not
        if current.is_recording():
            current.record_exception(exc)
            current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        current.end()
        _detach(token)


def start_span(
    name: str,
    *,
    tracer: trace.Tracer | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    parent: SpanContext | None = None,
    links: Iterable[Link] = (),
    **attrs: Any,
) -> trace.Span:
    """`span`'s span without making it current: for work that outlives one block of code (a
    call sent now and collected later); the caller ends it."""
    tracer = tracer or get_tracer()
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None
    return tracer.start_span(name, context=context, kind=kind, links=list(links), attributes=span_attributes(attrs))


def _detach(token: contextvars.Token) -> None:
    """Make the span no longer current. A generator holding the span (a streaming gRPC handler
    whose call was cancelled while it waited at `yield`) may be closed later by the event loop
    in another context: there is nothing to restore there, and OpenTelemetry's own detach would
    log a traceback for it."""
    try:
        token.var.reset(token)
    except ValueError:  # created in another context
        pass


def annotate(span_: trace.Span | None = None, **attrs: Any) -> None:
    """Add `tandem.<key>` attributes to `span_`, or to the current span, once they are known."""
    target = span_ if span_ is not None else trace.get_current_span()
    target.set_attributes(span_attributes(attrs))


def current_trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span as 32 and 16 hex digits (Jaeger's form)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


class RequestSpans:
    """The span that stands for each running request, for work done on its behalf elsewhere.

    The decode engine's thread batches every speculating request into one draft call per
    step, and has no trace context of its own. The decode worker binds each request's span
    here while the request runs; the draft client reads them to parent its span under one
    request and link the others. Bound on the event loop, read on the engine thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: dict[str, list[SpanContext]] = {}

    @contextmanager
    def bind(self, request_id: str, span_: trace.Span | None = None) -> Iterator[None]:
        """`span_` (default: the current span) stands for `request_id` inside the block."""
        context = (span_ if span_ is not None else trace.get_current_span()).get_span_context()
        if not context.is_valid:
            yield
            return
        with self._lock:
            self._spans.setdefault(request_id, []).append(context)
        try:
            yield
        finally:
            with self._lock:
                stack = self._spans.get(request_id, [])
                if context in stack:
                    stack.remove(context)
                if not stack:
                    self._spans.pop(request_id, None)

    def get(self, request_id: str) -> SpanContext | None:
        """The innermost span bound for `request_id`, or None."""
        with self._lock:
            stack = self._spans.get(request_id)
            return stack[-1] if stack else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._spans)


class _PairsGetter(Getter):
    """Reads W3C headers from gRPC metadata: a sequence of (key, value) pairs."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [value for k, value in carrier if k.lower() == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


class _PairsSetter(Setter):
    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key, value))


def extract_context(metadata: Sequence[tuple[str, Any]] | None) -> Context:
    """The remote parent carried by `traceparent`/`tracestate`/`baggage` metadata, if any."""
    return PROPAGATOR.extract(list(metadata or ()), getter=_PairsGetter())


def inject_context(context: Context | None = None) -> list[tuple[str, str]]:
    """Metadata pairs that carry `context` (default: the current one) to the next hop."""
    pairs: list[tuple[str, str]] = []
    PROPAGATOR.inject(pairs, context=context, setter=_PairsSetter())
    return pairs
