"""A worker's self-registration with its scheduler(s), repeated as a heartbeat.

The worker registers at start-up and again every `interval_s`. Registering is idempotent on the
scheduler; repeating it is how a restarted scheduler (a new pod behind the same Service) learns
its workers back. The scheduler address's host is resolved on every round and the worker
registers with each IPv4 address it names: a Kubernetes headless Service lists every scheduler
pod, ready or not, so each scheduler replica (and a new one during a rollout) knows every
worker. A name that does not resolve here is left to gRPC's own resolver. Failures retry with a
backoff capped at the interval; a refusal (another model, a bad address) stops registering with
that scheduler.

Knows nothing of the worker beyond the request it sends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import grpc

from services.common.server import CHANNEL_OPTIONS
from services.common.tls import PLAINTEXT, Tls
from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
FIRST_RETRY_S = 0.2
MAX_RETRY_S = 5.0


async def resolve_targets(address: str) -> list[str]:
    """host:port -> one host:port per IPv4 address of host (as given when it does not resolve)."""
    host, _, port = address.rpartition(":")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError):
        return [address]
    ips = sorted({info[4][0] for info in infos})
    return [f"{ip}:{port}" for ip in ips] or [address]


def _dns_name(address: str) -> str:
    """The host of host:port when it is a name (its resolved addresses are checked against it)."""
    host = address.rpartition(":")[0]
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return ""


class Registrar:
    """Registers `request` with every scheduler `address` resolves to, every `interval_s`."""

    def __init__(
        self,
        address: str,
        request: worker_pb2.RegisterWorkerRequest,
        *,
        interval_s: float,
        tls: Tls = PLAINTEXT,
    ):
        self.address = address
        self._tls = tls  # each resolved address is checked against the scheduler's name in `address`
        self.request = request
        self.interval_s = interval_s
        self.resolve = resolve_targets  # replaceable: tests stand in for a DNS name with several records
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._registered: set[str] = set()  # targets whose last registration succeeded
        self._refused: set[str] = set()

    @property
    def registered(self) -> set[str]:
        return set(self._registered)

    async def run(self) -> None:
        delay = min(FIRST_RETRY_S, self.interval_s)
        try:
            while True:
                targets = [t for t in await self.resolve(self.address) if t not in self._refused]
                for gone in set(self._channels) - set(targets):
                    await self._channels.pop(gone).close()
                    self._registered.discard(gone)
                results = await asyncio.gather(*(self._register(t) for t in targets))
                if all(results) and targets:
                    delay = min(FIRST_RETRY_S, self.interval_s)
                    await asyncio.sleep(self.interval_s)
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_S, self.interval_s)
        finally:
            await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
            self._channels.clear()

    async def _register(self, target: str) -> bool:
        """One registration; True when accepted (or refused for good: nothing to retry)."""
        channel = self._channels.get(target)
        if channel is None:
            # untraced: a heartbeat every few seconds would be a trace every few seconds
            channel = self._channels[target] = self._tls.aio_channel(
                target, options=CHANNEL_OPTIONS, server_name=_dns_name(self.address)
            )
        was_registered = target in self._registered
        try:
            resp = await worker_pb2_grpc.SchedulerStub(channel).RegisterWorker(
                self.request, timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            (log.warning if was_registered else log.info)(
                "registration with scheduler %s (%s) failed (%s); retrying",
                target,
                self.address,
                e.code().name,
            )
            self._registered.discard(target)
            return False
        if not resp.accepted:
            log.error("scheduler %s (%s) refused registration: %s", target, self.address, resp.message)
            self._refused.add(target)
            self._registered.discard(target)
            return True
        if not was_registered:
            log.info("registered with scheduler %s (%s) as %s", target, self.address, self.request.address)
        self._registered.add(target)
        return True
