"""Traces across real in-process grpc.aio hops: client -> A -> B, with our interceptors.

The methods are generic bytes handlers (no protos needed): A forwards each call to B
through a channel carrying the client interceptors, B does the work inside an in-process
span. Every span lands in one InMemorySpanExporter; A and B have their own providers and
so their own service.name, as two processes would.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from shared.telemetry import (
    TelemetryConfig,
    annotate,
    attributes,
    bind_request_id,
    build_tracer_provider,
    client_interceptors,
    get_tracer,
    server_interceptors,
    setup_telemetry,
    span,
)
from tests.helpers.otlp import OtlpReceiver

SERVICE = "test.v1.Hop"


def _provider(name: str, exporter: InMemorySpanExporter):
    return build_tracer_provider(TelemetryConfig(service_name=name), [SimpleSpanProcessor(exporter)])


def _b_handler(provider):
    tracer = get_tracer(provider)

    async def unary(request: bytes, context) -> bytes:
        with span("work", tracer=tracer, request_id="r-1", prompt_tokens=len(request)):
            annotate(cached_tokens=2)
        return b"b:" + request

    async def stream(request: bytes, context):
        for i in range(3):
            with span("step", tracer=tracer, index=i):
                await asyncio.sleep(0)
            yield bytes([i])

    async def not_found(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    async def crash(request: bytes, context) -> bytes:
        raise RuntimeError("boom")

    async def slow_stream(request: bytes, context):
        yield b"first"
        await asyncio.sleep(30)
        yield b"never"

    async def busy_stream(request: bytes, context):
        # a span open across yields that never await: a cancel lands while grpc sends
        with span("busy", tracer=tracer):
            while True:
                yield b"x" * 1024

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
            "Crash": grpc.unary_unary_rpc_method_handler(crash),
            "SlowStream": grpc.unary_stream_rpc_method_handler(slow_stream),
            "BusyStream": grpc.unary_stream_rpc_method_handler(busy_stream),
        },
    )


def _a_handler(b_channel: grpc.aio.Channel):
    def forward(method: str):
        async def unary(request: bytes, context) -> bytes:
            try:
                return await b_channel.unary_unary(f"/{SERVICE}/{method}")(request)
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details())

        return unary

    async def stream(request: bytes, context):
        async for item in b_channel.unary_stream(f"/{SERVICE}/Stream")(request):
            yield item

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {name: grpc.unary_unary_rpc_method_handler(forward(name)) for name in ("Unary", "NotFound", "Crash")}
        | {"Stream": grpc.unary_stream_rpc_method_handler(stream)},
    )


async def _serve(handler, provider) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=server_interceptors(provider))
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def hops():
    """(exporter, address of A, address of B); A forwards to B."""
    exporter = InMemorySpanExporter()
    provider_a, provider_b = _provider("svc-a", exporter), _provider("svc-b", exporter)
    server_b, addr_b = await _serve(_b_handler(provider_b), provider_b)
    b_channel = grpc.aio.insecure_channel(addr_b, interceptors=client_interceptors(provider_a))
    server_a, addr_a = await _serve(_a_handler(b_channel), provider_a)
    yield exporter, addr_a, addr_b
    await b_channel.close()
    await server_a.stop(None)
    await server_b.stop(None)


async def _until(predicate, timeout: float = 5.0) -> None:
    # Client spans end from the call's done-callback, a loop iteration after the caller resumes.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _by_name(spans, name: str, kind: SpanKind | None = None):
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, f"{name}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


def _server_of(spans, service: str):
    found = [
        s for s in spans if s.kind == SpanKind.SERVER and s.resource.attributes["service.name"] == service
    ]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _traceparent() -> tuple[str, str, list[tuple[str, str]]]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, [("traceparent", f"00-{trace_id}-{span_id}-01")]


async def test_client_traceparent_is_continued_across_two_hops(hops):
    exporter, addr_a, _ = hops
    trace_id, client_span_id, metadata = _traceparent()
    async with grpc.aio.insecure_channel(addr_a) as channel:  # a foreign client: no interceptors
        reply = await channel.unary_unary(f"/{SERVICE}/Unary")(b"hi", metadata=metadata)
    assert reply == b"b:hi"
    await _until(lambda: len(exporter.get_finished_spans()) == 4)
    spans = exporter.get_finished_spans()

    name = f"{SERVICE}/Unary"
    a_server, b_server = _server_of(spans, "svc-a"), _server_of(spans, "svc-b")
    a_client = _by_name(spans, name, SpanKind.CLIENT)
    work = _by_name(spans, "work")

    assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
    assert format(a_server.parent.span_id, "016x") == client_span_id
    assert a_server.parent.is_remote
    assert a_client.parent.span_id == a_server.context.span_id
    assert b_server.parent.span_id == a_client.context.span_id
    assert work.parent.span_id == b_server.context.span_id

    assert a_server.resource.attributes["service.name"] == "svc-a"
    assert b_server.resource.attributes["service.name"] == "svc-b"
    assert a_server.attributes[attributes.RPC_SYSTEM] == "grpc"
    assert a_server.attributes[attributes.RPC_SERVICE] == SERVICE
    assert a_server.attributes[attributes.RPC_METHOD] == "Unary"
    for s in (a_server, a_client, b_server):
        assert s.attributes[attributes.RPC_GRPC_STATUS_CODE] == 0
        assert s.status.status_code == StatusCode.UNSET
    assert work.attributes[attributes.REQUEST_ID] == "r-1"
    assert work.attributes[attributes.PROMPT_TOKENS] == 2
    assert work.attributes[attributes.CACHED_TOKENS] == 2


async def test_without_traceparent_a_new_trace_starts_at_the_first_server(hops):
    exporter, addr_a, _ = hops
    async with grpc.aio.insecure_channel(addr_a) as channel:
        await channel.unary_unary(f"/{SERVICE}/Unary")(b"x")
    await _until(lambda: len(exporter.get_finished_spans()) == 4)
    spans = exporter.get_finished_spans()
    assert _server_of(spans, "svc-a").parent is None
    assert len({s.context.trace_id for s in spans}) == 1


async def test_server_streaming_spans_cover_the_stream(hops):
    exporter, addr_a, _ = hops
    _, _, metadata = _traceparent()
    async with grpc.aio.insecure_channel(addr_a) as channel:
        items = [m async for m in channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=metadata)]
    assert items == [b"\x00", b"\x01", b"\x02"]
    await _until(lambda: len(exporter.get_finished_spans()) == 6)
    spans = exporter.get_finished_spans()

    a_server, b_server = _server_of(spans, "svc-a"), _server_of(spans, "svc-b")
    a_client = _by_name(spans, f"{SERVICE}/Stream", SpanKind.CLIENT)
    steps = [s for s in spans if s.name == "step"]
    assert b_server.parent.span_id == a_client.context.span_id
    assert a_client.parent.span_id == a_server.context.span_id
    assert [s.attributes["tandem.index"] for s in steps] == [0, 1, 2]
    assert all(s.parent.span_id == b_server.context.span_id for s in steps)
    # The SERVER span of B ends after its last message, so it encloses every step.
    assert b_server.end_time >= max(s.end_time for s in steps)
    assert all(s.attributes[attributes.RPC_GRPC_STATUS_CODE] == 0 for s in (a_server, a_client, b_server))


@pytest.mark.parametrize(
    ("method", "code", "server_error"),
    [("NotFound", grpc.StatusCode.NOT_FOUND, False), ("Crash", grpc.StatusCode.UNKNOWN, True)],
)
async def test_status_codes_are_recorded_on_every_hop(hops, method, code, server_error):
    exporter, addr_a, _ = hops
    async with grpc.aio.insecure_channel(addr_a) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(f"/{SERVICE}/{method}")(b"")
    assert err.value.code() == code
    await _until(lambda: len(exporter.get_finished_spans()) == 3)
    spans = exporter.get_finished_spans()

    client = _by_name(spans, f"{SERVICE}/{method}", SpanKind.CLIENT)
    a_server, b_server = _server_of(spans, "svc-a"), _server_of(spans, "svc-b")
    for s in (client, a_server, b_server):
        assert s.attributes[attributes.RPC_GRPC_STATUS_CODE] == code.value[0]
    # A client sees every failure as an error; a server only its own faults (OTel semconv).
    assert client.status.status_code == StatusCode.ERROR
    expected = StatusCode.ERROR if server_error else StatusCode.UNSET
    assert b_server.status.status_code == expected
    if method == "Crash":
        assert [e.name for e in b_server.events] == ["exception"]
        assert b_server.events[0].attributes["exception.message"] == "boom"


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_abandoned_stream_ends_both_spans_with_its_code(how):
    exporter = InMemorySpanExporter()
    provider = _provider("svc-b", exporter)
    server, addr = await _serve(_b_handler(provider), provider)
    try:
        async with grpc.aio.insecure_channel(addr, interceptors=client_interceptors(provider)) as channel:
            call = channel.unary_stream(f"/{SERVICE}/SlowStream")(
                b"", timeout=0.3 if how == "deadline" else None
            )
            assert await call.read() == b"first"
            if how == "cancel":
                call.cancel()
            await _until(lambda: len(exporter.get_finished_spans()) == 2)
    finally:
        await server.stop(None)
    spans = exporter.get_finished_spans()
    server_span = _by_name(spans, f"{SERVICE}/SlowStream", SpanKind.SERVER)
    client_span = _by_name(spans, f"{SERVICE}/SlowStream", SpanKind.CLIENT)
    code = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert server_span.attributes[attributes.RPC_GRPC_STATUS_CODE] == code.value[0]
    assert client_span.attributes[attributes.RPC_GRPC_STATUS_CODE] == code.value[0]
    assert client_span.status.status_code == StatusCode.ERROR
    # On the server a cancelled call is the caller's doing; an expired deadline is not.
    expected = StatusCode.ERROR if how == "deadline" else StatusCode.UNSET
    assert server_span.status.status_code == expected


async def test_cancelled_stream_closes_its_handler_in_its_own_task(caplog):
    # grpc abandons an async-generator handler cancelled while it sends; closed later by the
    # garbage collector in another task, a span open across its yields could not be detached
    # ("Failed to detach context" logged with a traceback)
    exporter = InMemorySpanExporter()
    provider = _provider("svc-b", exporter)
    server, addr = await _serve(_b_handler(provider), provider)
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            for _ in range(5):
                call = channel.unary_stream(f"/{SERVICE}/BusyStream")(b"")
                for _ in range(3):
                    await call.read()
                call.cancel()
            await _until(lambda: len([s for s in exporter.get_finished_spans() if s.name == "busy"]) == 5)
            gc.collect()
            await asyncio.sleep(0.1)
    finally:
        await server.stop(None)
    failed = [r for r in caplog.records if "detach" in r.getMessage()]
    assert not failed, failed[0].getMessage()


async def test_bound_request_id_travels_in_metadata_to_the_server_span():
    exporter = InMemorySpanExporter()
    provider = _provider("svc-b", exporter)
    server, addr = await _serve(_b_handler(provider), provider)
    try:
        async with grpc.aio.insecure_channel(addr, interceptors=client_interceptors(provider)) as channel:
            with bind_request_id("req-42"), span("generate", tracer=get_tracer(provider)):
                await channel.unary_unary(f"/{SERVICE}/Unary")(b"x")
            await _until(lambda: len(exporter.get_finished_spans()) == 4)
    finally:
        await server.stop(None)
    spans = exporter.get_finished_spans()
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        assert _by_name(spans, f"{SERVICE}/Unary", kind).attributes[attributes.REQUEST_ID] == "req-42"


def test_span_records_an_escaping_exception_as_error():
    exporter = InMemorySpanExporter()
    tracer = get_tracer(_provider("svc", exporter))
    with pytest.raises(ValueError), span("verify", tracer=tracer, spec_proposed=4, finish_reason=None):
        raise ValueError("bad draft")
    (s,) = exporter.get_finished_spans()
    assert s.status.status_code == StatusCode.ERROR
    assert s.attributes[attributes.SPEC_PROPOSED] == 4
    assert attributes.FINISH_REASON not in s.attributes  # None values are left out


def test_a_span_in_a_generator_closed_from_another_context_ends_without_an_error(caplog):
    """A gRPC streaming handler whose call is cancelled while it waits at `yield` is closed later,
    by the event loop's async-generator finalizer in another context: its span must still end,
    without OpenTelemetry's "Failed to detach context" traceback."""
    import contextvars

    exporter = InMemorySpanExporter()
    tracer = get_tracer(_provider("svc", exporter))

    def stream():
        with span("decode", tracer=tracer, request_id="r1"):
            yield 1
            yield 2

    gen = stream()
    started_in = contextvars.copy_context()  # like the handler's task, gone once cancelled
    assert started_in.run(next, gen) == 1
    with caplog.at_level("ERROR"):
        contextvars.Context().run(gen.close)  # closed in a context other than the one it started in
    assert not [r for r in caplog.records if "detach" in r.getMessage()]
    (s,) = exporter.get_finished_spans()
    assert s.name == "decode" and s.status.status_code != StatusCode.ERROR


async def test_otlp_exporter_delivers_spans_to_a_collector_on_shutdown():
    with OtlpReceiver() as receiver:
        config = TelemetryConfig(service_name="svc-otlp", otlp_endpoint=receiver.endpoint)
        telemetry = setup_telemetry(config, set_global=False, configure_logs=False)
        server, addr = await _serve(_b_handler(telemetry.tracer_provider), telemetry.tracer_provider)
        try:
            async with grpc.aio.insecure_channel(
                addr, interceptors=telemetry.client_interceptors()
            ) as channel:
                with telemetry.span("generate", request_id="req-otlp"):
                    await channel.unary_unary(f"/{SERVICE}/Unary")(b"abc")
                await asyncio.sleep(0.05)  # let the client span's done-callback run
        finally:
            await server.stop(None)
        assert receiver.spans == []  # batched: nothing is sent before the flush
        await asyncio.to_thread(telemetry.shutdown)
        spans = receiver.wait_for_spans(lambda s: len(s) >= 4)

    assert {s["service"] for s in spans} == {"svc-otlp"}
    assert len({s["trace_id"] for s in spans}) == 1
    by_name = {(s["name"], s["kind"]): s for s in spans}
    root = by_name[("generate", "INTERNAL")]
    client = by_name[(f"{SERVICE}/Unary", "CLIENT")]
    server_span = by_name[(f"{SERVICE}/Unary", "SERVER")]
    work = by_name[("work", "INTERNAL")]
    assert root["parent_span_id"] is None
    assert client["parent_span_id"] == root["span_id"]
    assert server_span["parent_span_id"] == client["span_id"]
    assert work["parent_span_id"] == server_span["span_id"]
    assert root["attributes"][attributes.REQUEST_ID] == "req-otlp"
    assert server_span["attributes"][attributes.RPC_GRPC_STATUS_CODE] == 0


def test_spans_and_logs_are_usable_without_importing_grpc():
    """The engine never imports grpc, yet it records spans and logs through this package."""
    code = (
        "import sys\n"
        "from shared.telemetry import span, annotate, get_logger, Metrics\n"
        "with span('step', request_id='r'):\n"
        "    annotate(spec_accepted=1)\n"
        "assert 'grpc' not in sys.modules, 'grpc was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_span_with_an_explicit_parent_and_links():
    """Work done for a request off its own task (the draft call on the engine thread)."""
    from opentelemetry.trace import Link

    exporter = InMemorySpanExporter()
    tracer = get_tracer(_provider("svc", exporter))
    with span("request a", tracer=tracer) as a, span("request b", tracer=tracer) as b:
        pass
    with span("shared call", tracer=tracer, parent=a.get_span_context(), links=[Link(b.get_span_context())]):
        pass
    call = next(s for s in exporter.get_finished_spans() if s.name == "shared call")
    assert call.parent.span_id == a.get_span_context().span_id
    assert call.context.trace_id == a.get_span_context().trace_id
    assert [link.context.span_id for link in call.links] == [b.get_span_context().span_id]


def test_request_spans_bind_nest_and_unbind():
    from shared.telemetry import RequestSpans

    exporter = InMemorySpanExporter()
    tracer = get_tracer(_provider("svc", exporter))
    spans = RequestSpans()
    assert spans.get("r") is None
    with span("server", tracer=tracer) as outer, spans.bind("r"):  # the current span
        assert spans.get("r") == outer.get_span_context()
        with span("decode", tracer=tracer) as inner, spans.bind("r", inner):
            assert spans.get("r") == inner.get_span_context()
        assert spans.get("r") == outer.get_span_context()
    assert spans.get("r") is None and len(spans) == 0
    with spans.bind("no span"):  # no current span: nothing to bind
        assert spans.get("no span") is None
