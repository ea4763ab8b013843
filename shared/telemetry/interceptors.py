"""grpc.aio interceptors that carry one trace across every hop of a request.

Server side: read W3C `traceparent`/`tracestate` (and `baggage`) from the invocation
metadata, open a SERVER span named `package.Service/Method` as a child of it (a client
that sends a `traceparent` gets its trace continued), make it current while the handler
runs, and close it with the gRPC status code. The `x-request-id` metadata, when present,
becomes the `tandem.request_id` attribute and is bound for logging.

Client side: open a CLIENT span, inject its context (and the bound request id) into the
outgoing metadata, and close the span with the call's status code when the call is done.

All four arities are covered, for asyncio handlers (coroutines, async generators, or
coroutines that stream with `context.write`). The interceptors know nothing about
Tandem's messages.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.telemetry import attributes as A
from shared.telemetry.logs import bind_request_id, current_request_id
from shared.telemetry.tracing import extract_context, get_tracer, inject_context

REQUEST_ID_METADATA_KEY = "x-request-id"

# OTel semantic conventions for gRPC: on the server, only these codes are errors (the
# others describe the caller's mistake, not the server's); on the client, every non-OK code is.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _rpc_attributes(full_method: str) -> tuple[str, dict[str, str]]:
    """`/tandem.v1.Decode/Generate` -> span name `tandem.v1.Decode/Generate` and rpc.* attributes."""
    name = full_method.lstrip("/")
    service, _, method = name.rpartition("/")
    return name, {A.RPC_SYSTEM: "grpc", A.RPC_SERVICE: service, A.RPC_METHOD: method}


def _finish(span: trace.Span, code: grpc.StatusCode, details: str | None, error_codes) -> None:
    span.set_attribute(A.RPC_GRPC_STATUS_CODE, code.value[0])
    if code in error_codes:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))


def _metadata_value(metadata: Sequence[tuple[str, Any]], key: str) -> str | None:
    for k, value in metadata:
        if k.lower() == key and isinstance(value, str):
            return value
    return None


def start_server_span(
    tracer: trace.Tracer, method: str, metadata: Sequence[tuple[str, Any]], peer: str | None
) -> tuple[trace.Span, otel_context.Context, str | None]:
    """The SERVER span of a call to `method` (`/package.Service/Method`) with this metadata, as a
    child of the caller's span: (span, a context with it current, the x-request-id). Also for
    calls that arrive without gRPC (the draft's stream transport): run the call in `current_call`,
    end the span with `end_server_span`."""
    name, attrs = _rpc_attributes(method)
    request_id = _metadata_value(metadata, REQUEST_ID_METADATA_KEY)
    if request_id is not None:
        attrs[A.REQUEST_ID] = request_id
    if peer:
        attrs[A.NET_PEER] = peer
    parent = extract_context(metadata)
    span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attrs)
    return span, trace.set_span_in_context(span, parent), request_id


@contextmanager
def current_call(span_context: otel_context.Context, request_id: str | None):
    """Makes a server call's span current, and binds its request id for logging, while the block
    runs. The interceptor enters it per step rather than across `yield`s: a streaming handler
    may be closed from another task (cancellation, garbage collection), where a token taken
    there could not be detached."""
    token = otel_context.attach(span_context)
    try:
        with bind_request_id(request_id):
            yield
    finally:
        otel_context.detach(token)


def end_server_span(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
    """Records a server call's status code (an error only for the server's own failures) and ends its span."""
    _finish(span, code, details, _SERVER_ERROR_CODES)
    span.end()


class ServerTracingInterceptor(grpc.aio.ServerInterceptor):
    """Continues the caller's trace with a SERVER span around every handler."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = get_tracer(tracer_provider)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())

        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler

        if inspect.isasyncgenfunction(behavior):
            wrapped = self._wrap_stream(behavior, method, metadata)
        else:
            wrapped = self._wrap_unary(behavior, method, metadata)
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _start(self, method: str, metadata: Sequence[tuple[str, Any]], context) -> tuple:
        peer = context.peer() if hasattr(context, "peer") else None
        return start_server_span(self._tracer, method, metadata, peer)

    def _wrap_unary(self, behavior, method: str, metadata):
        async def traced(request_or_iterator, context):
            span, span_context, request_id = self._start(method, metadata, context)
            with _server_outcome(span, context):
                with current_call(span_context, request_id):
                    result = behavior(request_or_iterator, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result

        return traced

    def _wrap_stream(self, behavior, method: str, metadata):
        # A coroutine that writes with context.write, not an async generator: grpc abandons a
        # generator handler cancelled while it sends (the garbage collector closes it later,
        # in another task, where spans open across its yields cannot be detached). Here the
        # cancellation reaches this frame, which closes the handler's generator in its own task.
        async def traced(request_or_iterator, context) -> None:
            span, span_context, request_id = self._start(method, metadata, context)
            with _server_outcome(span, context):
                responses = behavior(request_or_iterator, context)
                try:
                    while True:
                        with current_call(span_context, request_id):
                            try:
                                response = await responses.__anext__()
                            except StopAsyncIteration:
                                break
                        await context.write(response)
                finally:
                    with current_call(span_context, request_id):
                        await responses.aclose()

        return traced


@contextmanager
def _server_outcome(span: trace.Span, context):
    """Ends `span` with the status the handler produced: returned, aborted, raised or cancelled."""
    with ExitStack() as stack:
        stack.callback(span.end)
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            _finish(span, code, None, _SERVER_ERROR_CODES)
            raise
        except BaseException as exc:
            code = _code(context)
            if code in (None, grpc.StatusCode.OK):
                # Neither abort() nor set_code(): grpc answers UNKNOWN for an escaped exception.
                code = grpc.StatusCode.UNKNOWN
                span.record_exception(exc)
            _finish(span, code, _details(context), _SERVER_ERROR_CODES)
            raise
        _finish(span, _code(context) or grpc.StatusCode.OK, _details(context), _SERVER_ERROR_CODES)


def _code(context) -> grpc.StatusCode | None:
    code = context.code()
    if isinstance(code, int):  # some grpc versions hand back the raw integer
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return code


def _details(context) -> str | None:
    details = context.details()
    if isinstance(details, bytes):
        details = details.decode(errors="replace")
    return details or None


class _ClientTracing:
    """Shared by the four client interceptor arities below."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = get_tracer(tracer_provider)
        self._finishing: set[asyncio.Task] = set()  # strong references until they run

    async def _intercept(self, continuation, details: grpc.aio.ClientCallDetails, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name, attrs = _rpc_attributes(method)
        request_id = current_request_id()
        if request_id is not None:
            attrs[A.REQUEST_ID] = request_id
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)

        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        for key, value in inject_context(trace.set_span_in_context(span)):
            metadata.add(key, value)
        if request_id is not None and REQUEST_ID_METADATA_KEY not in metadata:
            metadata.add(REQUEST_ID_METADATA_KEY, request_id)
        new_details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
            _finish(span, code, str(exc), _CLIENT_ERROR_CODES)
            span.end()
            raise
        call.add_done_callback(lambda done: self._on_done(span, done))
        return call

    def _on_done(self, span: trace.Span, call) -> None:
        end_time = time.time_ns()  # the status arrives through a coroutine; keep the real end
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the loop is gone (interpreter shutdown): end without a code
            span.end(end_time=end_time)
            return
        task = loop.create_task(self._finish_call(span, call, end_time))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    @staticmethod
    async def _finish_call(span: trace.Span, call, end_time: int) -> None:
        try:
            code, details = await call.code(), await call.details()
        except asyncio.CancelledError:
            code, details = grpc.StatusCode.CANCELLED, None
        _finish(span, code, details, _CLIENT_ERROR_CODES)
        span.end(end_time=end_time)


_CLIENT_ERROR_CODES = frozenset(c for c in grpc.StatusCode if c is not grpc.StatusCode.OK)


class _UnaryUnary(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStream(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnary(_ClientTracing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStream(_ClientTracing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator)


def client_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """Pass to `grpc.aio.insecure_channel(target, interceptors=...)`: one per call arity."""
    return [cls(tracer_provider) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def server_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """Pass to `grpc.aio.server(interceptors=...)`."""
    return [ServerTracingInterceptor(tracer_provider)]
