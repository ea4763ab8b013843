"""API keys of the public APIs: who may call, and how many calls one key may run at once.

Keys live in a file (TANDEM_API_KEYS_FILE), one per line; blank lines and `#` comments are
ignored. The file is re-read when it changes (its size, modification time or inode), so keys
rotate without a restart: add the new key, move the clients over, delete the old line. A key
that is gone from the file is refused from the next call on. A missing or unreadable file
refuses every key (fail closed).

A client sends `authorization: Bearer <key>` (gRPC metadata, or the HTTP header). Keys are
compared in constant time (`hmac.compare_digest`) and never logged or put in spans: a key is
named by `key_id`, the first 12 hex digits of its SHA-256.

`ApiKeys` knows nothing of gRPC; `ApiKeyInterceptor` applies it to a grpc.aio server, and the
HTTP front calls `authenticate` and `slot` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import Iterator, Sequence

import grpc

from services.common.errors import wrap_handler

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
# Reachable without a key: load balancers' and Kubernetes' probes, and worker registration
# (an internal call, guarded by mutual TLS: services/scheduler/servicer.py).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/tandem.v1.Scheduler/RegisterWorker")


def key_id(key: str) -> str:
    """A short, non-reversible name of a key for logs and metrics."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Unauthenticated(Exception):
    """No key, or a key the file does not hold (UNAUTHENTICATED, HTTP 401)."""


class TooManyRequests(Exception):
    """The key already runs its TANDEM_API_KEY_MAX_CONCURRENCY requests (RESOURCE_EXHAUSTED, HTTP 429)."""


class ApiKeys:
    """The keys of one file, re-read when it changes, and the calls running per key."""

    def __init__(self, path: str, *, max_concurrency: int = 0):
        self.path = path
        self.max_concurrency = max_concurrency  # 0: no limit
        self._keys: list[bytes] = []
        self._signature: tuple[int, int, int] | None = None
        self._running: dict[str, int] = {}
        self._unreadable = False  # logged once per episode, not once per request
        self._reload()

    def _refuse_all(self, why: str) -> None:
        if not self._unreadable:
            log.error("API keys file %s unreadable (%s): refusing every key", self.path, why)
        self._keys, self._signature, self._unreadable = [], None, True

    def _reload(self) -> None:
        """Re-read the file if it changed since the last read."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._refuse_all(e.strerror or type(e).__name__)
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return
        try:
            text = open(self.path, encoding="utf-8").read()
        except OSError as e:
            self._refuse_all(e.strerror or type(e).__name__)
            return
        except UnicodeDecodeError:
            self._refuse_all("not UTF-8")  # the message would quote the file's bytes
            return
        self._unreadable = False
        keys = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line.encode())
        self._keys, self._signature = keys, signature
        log.info("API keys file %s read: %d key(s)", self.path, len(keys))

    def authenticate(self, authorization: str | None) -> str:
        """The key id of a valid `Bearer <key>` value; raises Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("malformed authorization: expected 'Bearer <key>'")
        self._reload()
        given = key.encode()
        # every key compared, in constant time: neither the match nor its position leaks by timing
        matched = False
        for known in self._keys:
            matched |= hmac.compare_digest(given, known)
        if not matched:
            log.warning("refused an invalid API key (key id %s)", key_id(key))
            raise Unauthenticated("invalid API key")
        return key_id(key)

    @contextlib.contextmanager
    def slot(self, kid: str) -> Iterator[None]:
        """Holds one of the key's concurrent-call slots for the duration of a call."""
        running = self._running.get(kid, 0)
        if self.max_concurrency and running >= self.max_concurrency:
            log.warning("API key %s over its limit of %d concurrent requests", kid, self.max_concurrency)
            raise TooManyRequests(
                f"this API key already has {running} requests running "
                f"(TANDEM_API_KEY_MAX_CONCURRENCY={self.max_concurrency})"
            )
        self._running[kid] = running + 1
        try:
            yield
        finally:
            left = self._running[kid] - 1
            if left:
                self._running[kid] = left
            else:
                del self._running[kid]

    def running(self, kid: str) -> int:
        return self._running.get(kid, 0)


def _metadata_value(metadata: Sequence[tuple[str, object]] | None, key: str) -> str | None:
    for k, value in metadata or ():
        if k == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED without a valid key, RESOURCE_EXHAUSTED past the key's concurrency limit,
    for every method but OPEN_METHODS."""

    def __init__(self, keys: ApiKeys, open_methods: Sequence[str] = OPEN_METHODS):
        self._keys = keys
        self._open = tuple(open_methods)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        try:
            kid = self._keys.authenticate(
                _metadata_value(handler_call_details.invocation_metadata, AUTHORIZATION)
            )
        except Unauthenticated as e:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(e))
        return self._limited(handler, kid)

    def _limited(self, handler: grpc.RpcMethodHandler, kid: str) -> grpc.RpcMethodHandler:
        """Each call holds one of the key's slots; streaming requests (reflection) are
        authenticated, not counted."""
        keys = self._keys

        @contextlib.asynccontextmanager
        async def slot(context):
            try:
                with keys.slot(kid):
                    yield
            except TooManyRequests as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))

        return wrap_handler(handler, slot)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with `code`."""

    async def abort(request_or_iterator, context):
        await context.abort(code, details)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        abort, handler.request_deserializer, handler.response_serializer
    )
