"""Real service processes (`python -m services.<name>`) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import PLAINTEXT, Tls

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One service process; its output goes to a log file shown when a test fails."""

    tls: Tls = PLAINTEXT  # how tests dial it (set from its TANDEM_TLS_* settings)

    def __init__(self, name: str, env: dict[str, str], log_dir: Path):
        self.name = name
        self.port = int(env["TANDEM_PORT"])
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        # with TANDEM_TLS_*: the tests dial the service as its own peers do (its certificate, the CA)
        self.tls = _tls_of(env)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            cwd=ROOT,
            # the scheduler's HTTP API is off unless a test gives it a port (8000 would clash)
            env={
                **os.environ,
                "TANDEM_HOST": "127.0.0.1",
                "TANDEM_TORCH_THREADS": "1",
                "TANDEM_HTTP_PORT": "0",
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def health(self, service: str = "") -> int | None:
        """The health status, or None when the server does not answer."""
        try:
            with self.channel() as channel:
                req = health_pb2.HealthCheckRequest(service=service)
                return health_pb2_grpc.HealthStub(channel).Check(req, timeout=1.0).status
        except grpc.RpcError:
            return None

    def channel(self) -> grpc.Channel:
        """A channel to the service, secured the way its own peers' are."""
        return self.tls.channel(self.address)

    def wait_serving(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.health() != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not serving after {timeout_s}s:\n{self.log()}")
            time.sleep(0.2)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]


def _tls_of(env: dict[str, str]) -> Tls:
    if not env.get("TANDEM_TLS_CERT"):
        return PLAINTEXT

    def read(name: str) -> bytes | None:
        return Path(env[name]).read_bytes() if env.get(name) else None

    return Tls(cert=read("TANDEM_TLS_CERT"), key=read("TANDEM_TLS_KEY"), ca=read("TANDEM_TLS_CA"))


@contextlib.contextmanager
def serving(services: dict[str, Service]) -> Iterator[dict[str, Service]]:
    """Wait until every service is SERVING, yield them, then stop them all."""
    try:
        for s in services.values():
            s.wait_serving()
        yield services
    finally:
        stop_all(services.values())


def stop_all(services: Iterable[Service]) -> None:
    """SIGTERM every service, then wait for each (SIGKILL a straggler after 15 s)."""
    services = list(services)
    for s in services:
        s.terminate()
    for s in services:
        try:
            s.wait(15)
        except subprocess.TimeoutExpired:
            s.kill()
