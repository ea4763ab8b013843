"""Draft.Propose and Draft.Release over a plain TCP stream, beside the draft's gRPC server.

A decode worker calls the draft once per engine step and waits for the answer, so the call's
fixed cost is paid on every step. Through gRPC in Python a request crosses several threads on
each side (the channel's and the server's poller threads, the server's event loop) before the
handler runs, and on a host whose cores are shared with the engines each hand-off may wait for a
core: a k = 4 call whose compute takes 2-4 ms cost 4-6 ms as the caller waited (docs/benchmarks.md,
Speculative decoding). On this stream a request is one socket write on the caller's thread and
one wake-up of the draft's event loop, and the answer comes back the same way.

Wire format: each frame is its length (4 bytes, little-endian), then a `draft_pb2.StreamFrame`
carrying the method, the call's metadata (W3C traceparent) and the serialized request; the
answer echoes the call id with a gRPC status code and the serialized response. Answers come in
request order. The same servicer methods answer both transports, with the same spans (the
interceptor's names and attributes) and the same status codes for the same errors.

What it is not: authenticated or encrypted. The draft serves it only while its gRPC port is
plaintext (no TANDEM_TLS_CERT); with TLS on, decode workers call it over gRPC with TLS. It binds
to TANDEM_HOST like the gRPC port. Only the decode worker's engine thread calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping

import grpc
from google.protobuf.message import DecodeError

from services.common.errors import InvalidArgument, Unimplemented, status_of
from services.common.server import MAX_MESSAGE_BYTES
from services.common.telemetry import UNTRACED_METHODS
from shared.pb.tandem.v1 import draft_pb2
from shared.telemetry.interceptors import current_call, end_server_span, start_server_span

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")
SERVICE = "tandem.v1.Draft"
# method -> (request type, response type)
METHODS = {
    "Propose": (draft_pb2.ProposeRequest, draft_pb2.ProposeResponse),
    "Release": (draft_pb2.ReleaseRequest, draft_pb2.ReleaseResponse),
}


def encode(frame: draft_pb2.StreamFrame) -> bytes:
    body = frame.SerializeToString()
    return HEADER.pack(len(body)) + body


class StreamError(grpc.RpcError, grpc.Call):
    """A failed call on the stream, with the gRPC status code it would have had."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # grpc.Call's other methods: nothing to report for a stream call
    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self):
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False


_CODES = {c.value[0]: c for c in grpc.StatusCode}


# -- the draft's side ---------------------------------------------------------------------------
class DraftStreamServer:
    """Serves `servicer`'s Propose and Release (async methods taking (request, context)) on a TCP
    port, on the running event loop: the draft's engine runs there, one call at a time, whichever
    transport brought it."""

    def __init__(self, servicer, tracer, errors: Mapping[type, grpc.StatusCode] | None = None):
        self._handlers: dict[str, Callable] = {m: getattr(servicer, m) for m in METHODS}
        self._tracer = tracer
        self._errors = dict(errors or {})
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        peer_name = None  # as gRPC names peers
        if isinstance(peer, tuple):
            peer_name = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"ipv4:{peer[0]}:{peer[1]}"
        self._connections.add(writer)
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if size > MAX_MESSAGE_BYTES:
                    log.warning("draft stream: a %d-byte frame from %s exceeds %d bytes: closing", size, peer_name,
                                MAX_MESSAGE_BYTES)
                    return
                try:
                    frame = draft_pb2.StreamFrame.FromString(await reader.readexactly(size))
                except DecodeError:
                    log.warning("draft stream: an unreadable frame from %s: closing", peer_name)
                    return
                writer.write(encode(await self._call(frame, peer_name)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the decode worker closed the connection (or went away)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _call(self, frame: draft_pb2.StreamFrame, peer: str | None) -> draft_pb2.StreamFrame:
        out = draft_pb2.StreamFrame(call_id=frame.call_id)
        method = f"/{SERVICE}/{frame.method}"
        span, current = None, contextlib.nullcontext()
        # as over gRPC, Release (housekeeping) and methods not served are not traced
        if frame.method in METHODS and method not in UNTRACED_METHODS:
            metadata = [(m.key, m.value) for m in frame.metadata]
            span, span_context, request_id = start_server_span(self._tracer, method, metadata, peer)
            current = current_call(span_context, request_id)
        code, details = grpc.StatusCode.OK, ""
        try:
            with current:
                out.body = (await self._handle(frame)).SerializeToString()
        except Exception as e:  # noqa: BLE001 - a bad call fails alone, as over gRPC
            code, details = status_of(e, self._errors)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("draft stream: %s failed", frame.method)
        out.status_code, out.status_details = code.value[0], details
        if span is not None:
            end_server_span(span, code, details)
        return out

    async def _handle(self, frame: draft_pb2.StreamFrame):
        if frame.method not in METHODS:
            raise Unimplemented(f"method {frame.method!r} is not served on the stream")
        request_type, _ = METHODS[frame.method]
        try:
            request = request_type.FromString(frame.body)
        except DecodeError:
            raise InvalidArgument("body", f"not a {request_type.__name__}") from None
        return await self._handlers[frame.method](request, None)


# -- the decode worker's side -------------------------------------------------------------------
class StreamDraftStub:
    """The Draft stub's Propose (with `.future`) and Release over a draft's stream, for one
    thread. Connects on first use; a broken connection fails the calls that were out on it
    (UNAVAILABLE) and the next call connects again."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 1.0):
        self.address = f"{host}:{port}"
        self._host, self._port = host, port
        self._connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 0
        self._answers: dict[int, draft_pb2.StreamFrame] = {}  # arrived, not yet collected
        self._waiting: set[int] = set()  # sent, answer not arrived (and not given up)
        self.Propose = _Method(self, "Propose")
        self.Release = _Method(self, "Release")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv on the engine thread at shutdown
            except OSError:
                pass
            sock.close()

    def connect(self) -> None:
        """Opens the connection (calls do when there is none); StreamError UNAVAILABLE if it cannot."""
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self._connect_timeout_s)
        except OSError as e:
            raise StreamError(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.address}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buffer = sock, bytearray()
        self._answers.clear()
        self._waiting.clear()

    def _send(self, method: str, request, metadata) -> int:
        if self._sock is None:
            self.connect()
        self._next_id += 1
        frame = draft_pb2.StreamFrame(call_id=self._next_id, method=method, body=request.SerializeToString())
        for key, value in metadata or ():
            frame.metadata.add(key=key, value=value)
        try:
            self._sock.settimeout(None)
            self._sock.sendall(encode(frame))
        except OSError as e:
            self._broken()
            raise StreamError(grpc.StatusCode.UNAVAILABLE, f"sending to {self.address}: {e}") from None
        self._waiting.add(self._next_id)
        return self._next_id

    def _wait(self, call_id: int, deadline: float | None) -> draft_pb2.StreamFrame:
        """The answer of `call_id`, reading (and keeping) the answers before it."""
        while call_id not in self._answers:
            if call_id not in self._waiting or self._sock is None:
                raise StreamError(grpc.StatusCode.UNAVAILABLE, f"the connection to {self.address} closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._waiting.discard(call_id)  # its answer, should it come, is dropped
                raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            try:
                self._sock.settimeout(remaining)
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as e:
                self._broken()
                raise StreamError(grpc.StatusCode.UNAVAILABLE, f"reading from {self.address}: {e}") from None
            if not data:
                self._broken()
                raise StreamError(grpc.StatusCode.UNAVAILABLE, f"{self.address} closed the connection")
            self._buffer += data
            self._take_frames()
        return self._answers.pop(call_id)

    def _take_frames(self) -> None:
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + size:
                return
            frame = draft_pb2.StreamFrame.FromString(bytes(self._buffer[HEADER.size : HEADER.size + size]))
            del self._buffer[: HEADER.size + size]
            if frame.call_id in self._waiting:
                self._waiting.discard(frame.call_id)
                self._answers[frame.call_id] = frame

    def _forget(self, call_id: int) -> None:
        self._waiting.discard(call_id)
        self._answers.pop(call_id, None)

    def _broken(self) -> None:
        self.close()
        self._waiting.clear()
        self._answers.clear()


class _Method:
    """One method of StreamDraftStub, called like a gRPC stub's (blocking, or `.future`)."""

    def __init__(self, stub: StreamDraftStub, name: str):
        self._stub, self._name = stub, name
        self._response_type = METHODS[name][1]

    def __call__(self, request, timeout: float | None = None, metadata=None):
        return self.future(request, timeout=timeout, metadata=metadata).result()

    def future(self, request, timeout: float | None = None, metadata=None) -> StreamFuture:
        call_id = self._stub._send(self._name, request, metadata)
        deadline = None if timeout is None else time.monotonic() + timeout
        return StreamFuture(self._stub, call_id, deadline, self._response_type)


class StreamFuture:
    """A call sent on the stream; `result()` waits for its answer on the calling thread. Done
    callbacks run there, when the answer has been read."""

    def __init__(self, stub: StreamDraftStub, call_id: int, deadline: float | None, response_type):
        self._stub, self._id, self._deadline, self._type = stub, call_id, deadline, response_type
        self._response = None
        self._error: StreamError | None = None
        self._cancelled = False
        self._done = False
        self._callbacks: list[Callable] = []

    def result(self, timeout: float | None = None):
        if not self._done:
            self._collect()
        if self._error is not None:
            raise self._error
        return self._response

    def exception(self) -> StreamError | None:
        return self._error if self._done else None

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """Drops the answer (the draft may still compute it)."""
        if self._done:
            return False
        self._stub._forget(self._id)
        self._cancelled = self._done = True
        self._error = StreamError(grpc.StatusCode.CANCELLED, "Cancelled")
        return True

    def add_done_callback(self, fn: Callable) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def _collect(self) -> None:
        try:
            frame = self._stub._wait(self._id, self._deadline)
            code = _CODES.get(frame.status_code, grpc.StatusCode.UNKNOWN)
            if code != grpc.StatusCode.OK:
                self._error = StreamError(code, frame.status_details)
            else:
                self._response = self._type.FromString(frame.body)
        except StreamError as e:
            self._error = e
        self._done = True
        for fn in self._callbacks:
            fn(self)
