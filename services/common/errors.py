"""Domain errors of the services and their gRPC status codes, mapped in one interceptor.

Servicers and the modules under them raise plain exceptions; `ErrorInterceptor` turns them
into status codes once, for every unary and server-streaming method:

- `ServiceError` subclasses carry their own code (RESOURCE_EXHAUSTED, UNAVAILABLE, ...);
- exceptions listed in the `extra` mapping (e.g. the engine's `InvalidRequest`) get theirs;
- a failed downstream call (`grpc.aio.AioRpcError`) passes its code and details through,
  so a decode worker's INVALID_ARGUMENT reaches the client as INVALID_ARGUMENT;
- anything else is INTERNAL, and is logged with its traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import grpc

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a gRPC status code."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """A request field is wrong; the message starts with the field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhausted(ServiceError):
    """Not enough KV blocks (or another bounded resource) for the request."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """No healthy worker to serve the request, or a peer went away."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ServiceError):
    """The method is not served here (e.g. on the draft's stream transport, only Propose and Release are)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPrecondition(ServiceError):
    """The request cannot run on this worker as configured (e.g. the two sides' KV cache types differ)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DataLoss(ServiceError):
    """Transferred KV failed its checksum."""

    code = grpc.StatusCode.DATA_LOSS


def status_of(
    exc: BaseException, extra: Mapping[type, grpc.StatusCode] | None = None
) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client should see for `exc`."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    for typ, code in (extra or {}).items():
        if isinstance(exc, typ):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by unary-unary and unary-stream handlers to status codes."""

    def __init__(self, extra: Mapping[type, grpc.StatusCode] | None = None):
        self._extra = dict(extra or {})

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str):
        code, details = status_of(exc, self._extra)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=exc)
        await context.abort(code, details)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        @contextlib.asynccontextmanager
        async def mapped(context):
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                await self._abort(context, exc, method)

        return wrap_handler(handler, mapped)


def wrap_handler(handler: grpc.RpcMethodHandler, around) -> grpc.RpcMethodHandler:
    """`handler` with each unary-unary or unary-stream call run inside `around(context)`, an
    async context manager (which may turn what the call raises into a status); a handler of
    another shape is returned as it is."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            async with around(context):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request, context):
            async with around(context):
                async for response in inner_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler
