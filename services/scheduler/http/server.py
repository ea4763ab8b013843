"""uvicorn serving an ASGI app as a task on the running event loop (the grpc.aio server's).

The socket is bound in `start()`, so that a port in use fails the service's start-up with a
clear message, as the gRPC port does. uvicorn's own signal handling is left out: the
service's `run_until_signal` owns SIGTERM/SIGINT and stops both servers. `stop(grace_s)`
stops accepting, lets running requests finish for up to grace_s seconds, then cancels them
(a cancelled stream frees its KV like any disconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the service handles signals (services.common.server.run_until_signal)


class HttpServer:
    def __init__(
        self, app, *, host: str, port: int, grace_period_s: float = 5.0, tls_cert: str = "", tls_key: str = ""
    ):
        """`tls_cert`/`tls_key` (PEM files): serve HTTPS (no client certificate asked for)."""
        self._app = app
        self._tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key} if tls_cert else {}
        self._host = host
        self._requested_port = port
        self._grace_period_s = grace_period_s
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._requested_port))
        except OSError as e:
            sock.close()
            raise OSError(
                f"TANDEM_HTTP_PORT: could not bind {self._host}:{self._requested_port} ({e})"
            ) from None
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,  # the service's logging (structlog) stays as it is
            log_level="warning",  # uvicorn's start/stop lines are info; the service logs its own
            access_log=False,
            timeout_graceful_shutdown=max(1, round(self._grace_period_s)),
            timeout_keep_alive=30,
            **self._tls,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info(
            "serving the OpenAI-compatible HTTP API on %s:%d (%s)",
            self._host,
            self.port,
            "HTTPS" if self._tls else "plaintext HTTP",
        )
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        if self._server is None or self._task is None:
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = max(grace_s, 0.01)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
