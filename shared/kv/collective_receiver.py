"""The decode side of the collective KV transport (see shared.kv.collective for the protocol).

One `CollectiveKvReceiver` per decode worker: it hosts the TCPStore that senders
announce themselves on, runs one worker thread per announced pair (which pops transfer
headers in the sender's order and receives each payload), and hands payloads to
`recv(meta)` callers by transfer id.

This module knows neither gRPC, nor protobuf, nor the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.kv.buffers import HostBufferPool
from shared.kv.collective import (
    ANNOUNCE_QUEUE,
    DEFAULT_TIMEOUT_S,
    HEADER_QUEUE,
    STOP,
    TransferMeta,
    connect_store,
    epoch_prefix,
)
from shared.kv.errors import KvChecksumError, KvShapeMismatch, KvTransferError, KvTransferTimeout
from shared.kv.pair_group import RECEIVER_RANK, PairGroup, backend_for
from shared.kv.payload import Checksummer, dtype_from_name

log = logging.getLogger(__name__)

# Idle workers block on the store this long per call, then ask again: a long wait keeps
# c10d's per-timeout warning rare; close() and teardown wake them with STOP at once.
_IDLE_WAIT_S = 600.0
_MAX_DEAD_EPOCHS = 1024


@dataclass
class _Slot:
    """One transfer id: a waiter, an arrived payload, or both."""

    done: threading.Event = field(default_factory=threading.Event)
    received: TransferMeta | None = None  # what arrived, with the checksum computed here
    tensor: torch.Tensor | None = None
    error: KvTransferError | None = None
    epoch: str | None = None
    waiters: int = 0
    wakers: list[Callable[[], None]] = field(default_factory=list)  # async waiters
    arrived_at: float = 0.0


class CollectiveKvReceiver:
    """Receives KV payloads from any number of prefill workers (one pair group each).

    `host` must be reachable by the senders; `port=0` picks a free port. The backend
    follows `device` (gloo for CPU, nccl for CUDA), and senders must use the same.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        result_ttl_s: float | None = None,
        buffer_pool_bytes: int = 1 << 30,
    ):
        self.host = host
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.timeout_s = timeout_s
        self.result_ttl_s = timeout_s if result_ttl_s is None else result_ttl_s
        self.buffers = HostBufferPool(buffer_pool_bytes)  # CPU receive buffers, reused
        # TCPStore's server listens on every interface unless handed a socket: bind it to `host`
        # only (the pod or host address senders dial), and let the store own the socket.
        listener = socket.create_server((host, port), backlog=128)
        self._server = dist.TCPStore(
            host,
            listener.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout_s),
            master_listen_fd=listener.detach(),
        )
        self.port = self._server.port
        self._cond = threading.Condition()
        self._server_lock = threading.Lock()  # the server object is also our client for STOP pushes
        self._pairs: dict[str, _PairWorker] = {}
        self._slots: dict[str, _Slot] = {}
        self._dead_epochs: OrderedDict[str, str] = OrderedDict()  # epoch -> why
        self._closed = False
        self._listener = threading.Thread(target=self._listen, name="kv-recv-announce", daemon=True)
        self._listener.start()

    @property
    def address(self) -> str:
        """Where senders reach this receiver, as host:port (goes in the KV target)."""
        return f"{self.host}:{self.port}"

    def recv(self, meta: TransferMeta, *, timeout_s: float | None = None) -> torch.Tensor:
        """The payload `meta` describes, on this receiver's device, checksum verified.

        On CPU its memory comes from the receiver's buffer pool and goes back there when
        the last reference to it is dropped (scatter it into the KV blocks, let it go).

        Raises KvTransferTimeout when it has not arrived within the timeout (the pair's
        group is torn down then), KvChecksumError / KvShapeMismatch when what arrived is
        not what `meta` promised, KvTransferError when the pair broke.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        slot = self._register(meta)
        try:
            with self._cond:
                while not slot.done.is_set() and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
        finally:
            self._unregister(meta, slot)
        return self._result(meta, slot, timeout_s)

    async def recv_async(self, meta: TransferMeta, *, timeout_s: float | None = None) -> torch.Tensor:
        """`recv` for an event loop, without a thread per waiter. Cancelling it only
        stops the wait: the payload, if it comes, is dropped after `result_ttl_s`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()

        def wake() -> None:  # runs under self._cond, on whichever thread finishes the slot
            loop.call_soon_threadsafe(lambda: arrived.done() or arrived.set_result(None))

        slot = self._register(meta, wake)
        try:
            if not slot.done.is_set():
                await asyncio.wait_for(arrived, timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
            pass  # _result raises KvTransferTimeout and tears the pair down
        finally:
            self._unregister(meta, slot, wake)
        return self._result(meta, slot, timeout_s)

    def _register(self, meta: TransferMeta, wake: Callable[[], None] | None = None) -> _Slot:
        with self._cond:
            slot = self._slots.setdefault(meta.transfer_id, _Slot(epoch=meta.epoch))
            slot.waiters += 1
            if wake is not None:
                slot.wakers.append(wake)
            why = self._dead_epochs.get(meta.epoch)
            if why is not None and not slot.done.is_set():
                self._finish(slot, None, KvTransferError(f"pair {meta.pair_name} epoch {meta.epoch}: {why}"))
            return slot

    def _unregister(self, meta: TransferMeta, slot: _Slot, wake: Callable[[], None] | None = None) -> None:
        with self._cond:
            slot.waiters -= 1
            if wake is not None:
                slot.wakers.remove(wake)
            if slot.done.is_set() or slot.waiters == 0:
                self._slots.pop(meta.transfer_id, None)

    def _result(self, meta: TransferMeta, slot: _Slot, timeout_s: float) -> torch.Tensor:
        if not slot.done.is_set():
            err = KvTransferTimeout(
                f"transfer {meta.transfer_id} on pair {meta.pair_name} not received in {timeout_s:.1f}s"
            )
            self._teardown(meta.pair_name, meta.epoch, err)
            raise err
        if slot.error is not None:
            raise slot.error
        _check_against(meta, slot.received)
        return slot.tensor

    def discard(self, transfer_id: str) -> None:
        """Forget a payload nobody will claim (the request was aborted)."""
        with self._cond:
            slot = self._slots.get(transfer_id)
            if slot is not None and slot.waiters == 0:
                del self._slots[transfer_id]

    def num_unclaimed(self) -> int:
        """Payloads that arrived and wait for their recv() (memory held by the receiver)."""
        with self._cond:
            return sum(1 for s in self._slots.values() if s.done.is_set() and s.waiters == 0)

    def pair_names(self) -> list[str]:
        with self._cond:
            return sorted(self._pairs)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pairs = list(self._pairs.values())
        for pair in pairs:
            self._teardown(pair.pair_name, pair.epoch, KvTransferError("receiver closed"))
        self._push(ANNOUNCE_QUEUE, STOP)
        self._listener.join(timeout=5)
        for pair in pairs:
            pair.join(timeout=self.timeout_s + 5)

    # --- called from the worker threads ----------------------------------------------

    def _listen(self) -> None:
        client = connect_store(self.host, self.port, _IDLE_WAIT_S)
        while not self._closed:
            try:
                raw = client.queue_pop(ANNOUNCE_QUEUE)
            except dist.DistStoreError:
                continue  # idle; ask again
            except Exception as e:  # the server is gone: we are shutting down
                log.warning("kv receiver announce listener stopped: %s", e)
                return
            if raw == STOP:
                return
            try:
                hello = json.loads(raw)
                self._start_pair(hello["pair_name"], hello["epoch"], hello["backend"])
            except Exception as e:
                log.warning("kv receiver: bad announce %r: %s", raw[:200], e)

    def _start_pair(self, pair_name: str, epoch: str, backend: str) -> None:
        if backend != self.backend:
            log.warning(
                "kv pair %s announced backend %s, receiver uses %s: ignored", pair_name, backend, self.backend
            )
            return
        with self._cond:
            if self._closed or epoch in self._dead_epochs:
                return
            old = self._pairs.get(pair_name)
        if old is not None:
            self._teardown(pair_name, old.epoch, KvTransferError(f"superseded by epoch {epoch}"))
        worker = _PairWorker(self, pair_name, epoch)
        with self._cond:
            self._pairs[pair_name] = worker
        worker.start()

    def _deliver(
        self, header: TransferMeta, tensor: torch.Tensor | None, error: KvTransferError | None
    ) -> None:
        now = time.monotonic()
        with self._cond:
            self._sweep(now)
            if header.epoch in self._dead_epochs:
                return  # its waiters have been failed already
            slot = self._slots.setdefault(header.transfer_id, _Slot(epoch=header.epoch))
            if slot.done.is_set():
                return
            slot.received = header
            slot.arrived_at = now
            self._finish(slot, tensor, error)

    def _teardown(self, pair_name: str, epoch: str, err: KvTransferError) -> None:
        """Mark `epoch` dead, fail its waiters, stop its worker (which aborts the group)."""
        with self._cond:
            self._dead_epochs[epoch] = str(err)
            while len(self._dead_epochs) > _MAX_DEAD_EPOCHS:
                self._dead_epochs.popitem(last=False)
            for slot in self._slots.values():
                if slot.epoch == epoch and not slot.done.is_set():
                    self._finish(slot, None, err)
            pair = self._pairs.get(pair_name)
            if pair is not None and pair.epoch == epoch:
                del self._pairs[pair_name]
                pair.stopping = True
            else:
                pair = None
        if pair is not None:
            (log.info if self._closed else log.warning)(
                "kv pair %s epoch %s torn down: %s", pair_name, epoch, err
            )
            self._push(f"{epoch_prefix(epoch)}/{HEADER_QUEUE}", STOP)

    def _finish(self, slot: _Slot, tensor: torch.Tensor | None, error: KvTransferError | None) -> None:
        # caller holds self._cond
        slot.tensor, slot.error = tensor, error
        slot.done.set()
        self._cond.notify_all()
        for wake in slot.wakers:
            wake()

    def _sweep(self, now: float) -> None:
        # caller holds self._cond: drop payloads nobody claimed within the TTL
        stale = [
            tid
            for tid, s in self._slots.items()
            if s.waiters == 0 and s.done.is_set() and now - s.arrived_at > self.result_ttl_s
        ]
        for tid in stale:
            del self._slots[tid]

    def _push(self, key: str, value: bytes) -> None:
        try:
            with self._server_lock:
                self._server.queue_push(key, value)
        except Exception as e:
            log.warning("kv receiver: cannot push %s: %s", key, e)


class _PairWorker(threading.Thread):
    """Receives one epoch of one pair, in the sender's order."""

    def __init__(self, owner: CollectiveKvReceiver, pair_name: str, epoch: str):
        super().__init__(name=f"kv-recv[{pair_name}]", daemon=True)
        self.owner = owner
        self.pair_name = pair_name
        self.epoch = epoch
        self.stopping = False

    def run(self) -> None:
        owner = self.owner
        try:
            client = connect_store(owner.host, owner.port, owner.timeout_s)
            store = dist.PrefixStore(epoch_prefix(self.epoch), client)
            group = PairGroup(store, RECEIVER_RANK, owner.device, owner.timeout_s, owner.host)
        except KvTransferError as e:
            owner._teardown(self.pair_name, self.epoch, e)
            return
        client.set_timeout(timedelta(seconds=_IDLE_WAIT_S))
        try:
            self._loop(store, group)
        except KvTransferError as e:
            owner._teardown(self.pair_name, self.epoch, e)
        except Exception as e:  # a bug or a broken store: still fail the waiters, never hang them
            owner._teardown(self.pair_name, self.epoch, KvTransferError(f"kv receiver worker failed: {e}"))
        finally:
            group.abort()

    def _loop(self, store: dist.Store, group: PairGroup) -> None:
        next_seq = 0
        while not self.stopping:
            try:
                raw = store.queue_pop(HEADER_QUEUE)
            except dist.DistStoreError:
                continue  # idle
            if raw == STOP:
                return
            header = TransferMeta.from_header_json(raw, checksum=0)
            if header.epoch != self.epoch or header.seq != next_seq:
                raise KvTransferError(
                    f"pair {self.pair_name}: got transfer {header.transfer_id}, expected seq {next_seq} of {self.epoch}"
                )
            next_seq += 1
            if self.owner.device.type == "cpu":
                flat = self.owner.buffers.take(header.nbytes)  # [nbytes] uint8, warm pages
            else:
                flat = torch.empty(header.nbytes, dtype=torch.uint8, device=self.owner.device)
            acc = Checksummer(header.checksum_kind, header.nbytes)
            group.recv(flat, on_segment=acc.update)
            tensor = flat.view(dtype_from_name(header.dtype)).view(header.shape)
            # what arrived, with the checksum of what arrived: recv() holds it against the meta
            self.owner._deliver(replace(header, checksum=acc.value), tensor, None)


def _check_against(meta: TransferMeta, received: TransferMeta | None) -> None:
    """The meta from the gRPC stream must describe what arrived, checksum included."""
    if received is None:
        raise KvTransferError(f"transfer {meta.transfer_id}: no header")
    if (meta.shape, meta.dtype, meta.nbytes, meta.checksum_kind) != (
        received.shape,
        received.dtype,
        received.nbytes,
        received.checksum_kind,
    ):
        raise KvShapeMismatch(
            f"transfer {meta.transfer_id}: meta says {meta.dtype}{list(meta.shape)}, "
            f"payload is {received.dtype}{list(received.shape)}"
        )
    if meta.checksum != received.checksum:
        raise KvChecksumError(
            f"transfer {meta.transfer_id}: {meta.checksum_kind} of the bytes received is "
            f"{received.checksum}, the sender's is {meta.checksum}"
        )
