"""The gRPC server shell of every service: health, reflection, graceful stop.

A service builds its servicers and hands them to `GrpcServer`; its `__main__` runs it with
`run_until_signal` (until SIGTERM/SIGINT), tests call `start()`/`stop()` themselves. On stop,
the health service turns NOT_SERVING first, so that load balancers and the scheduler stop
sending work, then running calls get `grace_period_s` to finish before they are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.tls import PLAINTEXT, Tls

log = logging.getLogger(__name__)

# Large enough for KV chunks (bounded well below this by TANDEM_KV_CHUNK_BYTES) and long prompts.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class GrpcServer:
    """A grpc.aio server with the standard health service and server reflection."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        service_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        advertise_address: str = "",
        max_receive_bytes: int = MAX_MESSAGE_BYTES,
        tls: Tls = PLAINTEXT,
        public: bool = False,
        internal_port: int | None = None,
    ):
        """`tls`: how the ports are secured (services/common/tls.py). A `public` port asks clients
        for no certificate; any other requires one signed by the CA when mutual TLS is on.
        `internal_port` (a public server with mutual TLS): a second port that requires one."""
        options = [*CHANNEL_OPTIONS[:1], ("grpc.max_receive_message_length", max_receive_bytes)]
        self._server = grpc.aio.server(interceptors=list(interceptors), options=options)
        self._bind = f"{host}:{port}"
        self._advertise = advertise_address
        self._tls = tls
        self._public = public
        self._internal_bind = f"{host}:{internal_port}" if internal_port is not None and tls.mutual else None
        self.internal_port: int | None = None
        self.service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self.port: int | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def grpc_server(self) -> grpc.aio.Server:
        """For add_XServicer_to_server(...) before start()."""
        return self._server

    @property
    def address(self) -> str:
        """host:port other processes dial (the advertised address, or loopback and the bound port)."""
        return self._advertise or f"127.0.0.1:{self.port}"

    async def start(self, *, hold: Sequence[str] = ()) -> int:
        """Bind, start and report SERVING (except the service names in `hold`, which stay
        NOT_SERVING until `set_serving`); returns the bound port."""
        self.port = self._tls.add_port(self._server, self._bind, require_client_cert=not self._public)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self._bind}")
        if self._internal_bind is not None:
            self.internal_port = self._tls.add_port(
                self._server, self._internal_bind, require_client_cert=True
            )
            if self.internal_port == 0:
                raise RuntimeError(f"could not bind {self._internal_bind}")
        await self._server.start()
        for name in ["", *self.service_names]:
            serving = name not in hold
            status = health_pb2.HealthCheckResponse
            await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)
        host = self._bind.rsplit(":", 1)[0]
        log.info("serving %s on %s:%d", ", ".join(self.service_names), host, self.port)
        if self.internal_port is not None:
            log.info("internal port (mutual TLS, worker registration) on %s:%d", host, self.internal_port)
        return self.port

    async def set_serving(self, service: str, serving: bool) -> None:
        """Health of one service name; a server that is stopping stays NOT_SERVING."""
        if self._stopping:
            return
        status = health_pb2.HealthCheckResponse
        await self.health.set(service, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then give running calls grace_s seconds, then cancel them."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def run_until_signal(
    start: Callable[[], Awaitable[object]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Await start(), wait for SIGTERM or SIGINT, then await stop() (which stops gracefully)."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    await start()
    await signalled.wait()
    log.info("signal received: stopping")
    await stop()
    log.info("stopped")
