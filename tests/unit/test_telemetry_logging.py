"""Log lines are JSON, one per line, and lead to their trace: same trace_id as the active span."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
import structlog
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared.telemetry import (
    TelemetryConfig,
    bind_request_id,
    build_tracer_provider,
    client_interceptors,
    configure_logging,
    get_logger,
    get_tracer,
    server_interceptors,
    span,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("services", "shared", "tools"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.fixture
def tracer_and_spans():
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(TelemetryConfig(service_name="svc-log"), [SimpleSpanProcessor(exporter)])
    return get_tracer(provider), exporter, provider


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_carries_service_request_and_the_active_span_ids(restore_logging, tracer_and_spans):
    tracer, exporter, _ = tracer_and_spans
    out = io.StringIO()
    configure_logging("svc-log", json=None, stream=out)  # not a TTY: JSON
    log = get_logger(__name__)

    with bind_request_id("req-7"), span("prefill", tracer=tracer):
        log.info("prefill_done", prompt_tokens=5)
    log.warning("idle")

    first, second = _lines(out)
    (finished,) = exporter.get_finished_spans()
    assert first["event"] == "prefill_done"
    assert first["level"] == "info"
    assert first["service"] == "svc-log"
    assert first["request_id"] == "req-7"
    assert first["prompt_tokens"] == 5
    assert first["timestamp"].endswith("Z")
    assert first["trace_id"] == format(finished.context.trace_id, "032x")
    assert first["span_id"] == format(finished.context.span_id, "016x")
    # Outside the span and the request: no stale ids.
    assert second["level"] == "warning"
    assert "trace_id" not in second and "request_id" not in second


def test_level_filter_and_exceptions_stay_one_json_line(restore_logging):
    out = io.StringIO()
    configure_logging("svc-log", json=True, level="info", stream=out)
    log = get_logger()
    log.debug("too_chatty")
    try:
        raise RuntimeError("kv checksum mismatch")
    except RuntimeError:
        log.exception("transfer_failed")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "transfer_failed"
    assert record["level"] == "error"
    assert "kv checksum mismatch" in json.dumps(record["exception"])


def test_stdlib_logging_goes_through_the_same_processors(restore_logging, tracer_and_spans):
    tracer, exporter, _ = tracer_and_spans
    out = io.StringIO()
    configure_logging("svc-log", json=True, stream=out)
    with span("export", tracer=tracer):
        logging.getLogger("opentelemetry.exporter").warning("collector unreachable")
    (record,) = _lines(out)
    assert record["event"] == "collector unreachable"
    assert record["service"] == "svc-log"
    assert record["level"] == "warning"
    assert record["trace_id"] == format(exporter.get_finished_spans()[0].context.trace_id, "032x")


def test_console_renderer_on_a_tty(restore_logging):
    out = _Tty()
    configure_logging("svc-log", json=None, stream=out)
    with bind_request_id("req-tty"):
        get_logger().info("started", port=50051)
    text = out.getvalue()
    assert "started" in text and "req-tty" in text and "50051" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_logs_in_a_grpc_handler_carry_its_server_span_and_the_callers_request_id(
    restore_logging, tracer_and_spans
):
    tracer, exporter, provider = tracer_and_spans
    out = io.StringIO()
    configure_logging("svc-log", json=True, stream=out)
    log = get_logger()

    async def handler(request: bytes, context) -> bytes:
        log.info("handling", size=len(request))
        return request

    server = grpc.aio.server(interceptors=server_interceptors(provider))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.v1.Log", {"Echo": grpc.unary_unary_rpc_method_handler(handler)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=client_interceptors(provider)
        ) as channel:
            with bind_request_id("req-grpc"), span("generate", tracer=tracer):
                log.info("calling")
                await channel.unary_unary("/test.v1.Log/Echo")(b"abc")
    finally:
        await server.stop(None)

    calling, handling = _lines(out)
    server_span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert handling["event"] == "handling"
    assert handling["request_id"] == "req-grpc"  # arrived as x-request-id metadata
    assert handling["trace_id"] == format(server_span.context.trace_id, "032x") == calling["trace_id"]
    assert handling["span_id"] == format(server_span.context.span_id, "016x")
    assert calling["span_id"] != handling["span_id"]


def test_debug_level_reaches_tandems_own_stdlib_loggers_only(restore_logging):
    stream = io.StringIO()
    configure_logging("svc", json=True, level="debug", stream=stream)
    logging.getLogger("services.decode.worker").debug("KV of %s received", "r-1")
    logging.getLogger("grpc._cython").debug("internal chatter")
    (line,) = _lines(stream)
    assert (line["level"], line["event"]) == ("debug", "KV of r-1 received")
    configure_logging("svc", json=True, level="info", stream=stream)
    logging.getLogger("services.decode.worker").debug("hidden at info")
    assert len(_lines(stream)) == 1
