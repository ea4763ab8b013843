"""KV transfer over torch.distributed send/recv, one 2-rank group per (prefill, decode) pair.

Roles and wiring:
- The decode worker runs one `CollectiveKvReceiver`. It hosts a `TCPStore` server and
  puts its `.address` ("host:port") plus a pair name in each prefill request's KV target.
- The prefill worker gets a `CollectiveKvSender` for that (address, pair name) from its
  `KvSenderPool`. On first use the sender announces itself through the store; the
  receiver then builds its side of the pair group (receiver rank 0, sender rank 1).
  Each group lives under its own store prefix, so groups are independent of one another.
- `sender.submit(kv)` computes the whole-payload checksum, queues the bytes for the
  group and returns at once; its `.meta` (transfer id, shape, dtype, checksum) is what
  the services carry on the gRPC stream, and `await pending.wait_async()` says when the
  bytes have left (`send` / `send_async` do both). The decode side calls
  `receiver.recv(meta)`, which checks the bytes that arrived against the meta's checksum.

Ordering. Each side has one worker thread per pair. The sender numbers its transfers
(seq) and sends them in that order, pushing a header (the meta less the checksum) for
each onto a queue in the store just before the data; the receiver's worker pops the
headers in the same order and posts the matching receive, whether or not the meta has
reached it on the gRPC stream yet.
Send N therefore always meets recv N, and no tags are needed (NCCL has none), so the
same code serves gloo and NCCL. A payload whose meta never comes (the decode side gave
up) is kept for `result_ttl_s` and dropped.

Failure. Every wait has a deadline. A stalled or broken transfer raises
`KvTransferTimeout` / `KvTransferError`; the pair's group is aborted on that side, and
the sender starts a new group (a new epoch) with its next transfer. A dead sender
process shows up as a timeout or a closed connection on the receiver, which then drops
that pair; a restarted sender announces a new epoch under the same pair name, which
replaces the old one.

This module knows neither gRPC, nor protobuf, nor the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.kv.errors import KvTransferError, KvTransferTimeout
from shared.kv.pair_group import SENDER_RANK, PairGroup, backend_for
from shared.kv.payload import checksum, checksum_kind_for, dtype_name

log = logging.getLogger(__name__)

ANNOUNCE_QUEUE = "tandem-kv/announce"
HEADER_QUEUE = "hdr"  # under the epoch's prefix
STOP = b"__stop__"
DEFAULT_TIMEOUT_S = 30.0


def epoch_prefix(epoch: str) -> str:
    """The store prefix of one epoch's group (PrefixStore joins prefix and key with "/")."""
    return f"tandem-kv/epoch/{epoch}"


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"KV receiver address must be 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TransferMeta:
    """What the gRPC stream carries for one collective transfer."""

    transfer_id: str  # "<epoch>#<seq>", unique per sender process
    pair_name: str
    epoch: str  # one group's life; a new group after a failure gets a new epoch
    seq: int  # position in the epoch's send order
    shape: tuple[int, ...]
    dtype: str  # "float32" | "bfloat16" | "float16" | "fp8" | "int8" (packed 8-bit rows)
    nbytes: int
    checksum: int  # unsigned, fits uint64
    checksum_kind: str  # "crc32" (CPU payloads) | "sum64" (CUDA payloads), see shared.kv.payload

    def __post_init__(self):
        # a proto repeated field or JSON gives a list; comparisons need the tuple
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TransferMeta:
        return cls(**d)

    def header_json(self) -> bytes:
        """What goes through the store ahead of the data: everything but the checksum."""
        d = self.to_dict()
        del d["checksum"]
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_header_json(cls, raw: bytes | str, checksum: int) -> TransferMeta:
        return cls.from_dict({**json.loads(raw), "checksum": checksum})


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client connection of its own: a blocking wait holds a TCPStore client busy."""
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as e:
        raise KvTransferError(
            f"cannot reach KV receiver store at {host}:{port}: {str(e).splitlines()[0]}"
        ) from e


class PendingSend:
    """A submitted transfer: `meta` now (for the gRPC stream), completion later."""

    def __init__(self, meta: TransferMeta, future: concurrent.futures.Future):
        self.meta = meta
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> TransferMeta:
        """Block until the bytes have left; raises the transfer's KvTransferError."""
        try:
            return self._future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise KvTransferTimeout(
                f"transfer {self.meta.transfer_id} still queued after {timeout_s}s"
            ) from None

    async def wait_async(self) -> TransferMeta:
        return await asyncio.wrap_future(self._future)


@dataclass
class _SendItem:
    meta: TransferMeta
    flat: torch.Tensor  # [nbytes] uint8 view of the payload
    ready: torch.cuda.Event | None  # recorded on the submitter's stream (CUDA only)
    future: concurrent.futures.Future


class CollectiveKvSender:
    """The prefill side of one pair. Thread-safe; transfers go out in submit order."""

    def __init__(
        self,
        address: str,
        pair_name: str,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        host: str | None = None,
    ):
        self.address = address
        self.local_host = host  # where this side's gloo listens (see PairGroup)
        self.host, self.port = parse_address(address)
        self.pair_name = pair_name
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._epoch: str | None = None  # None: the next submit opens a new epoch
        self._next_seq = 0
        self._closed = False
        self._queue: queue.SimpleQueue[_SendItem | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"kv-send[{pair_name}]", daemon=True)
        self._thread.start()

    def submit(self, kv: torch.Tensor) -> PendingSend:
        """Checksum `kv`, queue it, return its meta at once. Transfers leave in submit order.

        Blocking for the checksum (crc32 runs at a few GB/s on CPU): call it through
        `asyncio.to_thread` from an event loop. `kv` must not change until the send is done.
        """
        kv = kv.detach()
        name = dtype_name(kv.dtype)
        if kv.device != self.device:
            kv = kv.to(self.device)
        kv = kv.contiguous()
        kind = checksum_kind_for(self.device)
        value = checksum(kv, kind)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise KvTransferError(f"sender for pair {self.pair_name} is closed")
            if self._epoch is None:
                self._epoch = uuid.uuid4().hex[:16]
                self._next_seq = 0
            seq = self._next_seq
            self._next_seq += 1
            meta = TransferMeta(
                transfer_id=f"{self._epoch}#{seq}",
                pair_name=self.pair_name,
                epoch=self._epoch,
                seq=seq,
                shape=tuple(kv.shape),
                dtype=name,
                nbytes=kv.numel() * kv.element_size(),
                checksum=value,
                checksum_kind=kind,
            )
            # enqueued under the lock, so queue order == seq order
            self._queue.put(_SendItem(meta, kv.view(torch.uint8).reshape(-1), ready, future))
        return PendingSend(meta, future)

    def send(self, kv: torch.Tensor) -> TransferMeta:
        """submit + wait. Safe before the meta is delivered: the receiver drains on its own."""
        return self.submit(kv).wait()

    async def send_async(self, kv: torch.Tensor) -> TransferMeta:
        pending = await asyncio.to_thread(self.submit, kv)
        return await pending.wait_async()

    def close(self) -> None:
        """Send what is already queued, then stop the worker; later submits raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=self.timeout_s + 5)

    # --- worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        group: PairGroup | None = None
        store: dist.Store | None = None
        group_epoch: str | None = None
        failed_epoch: str | None = None
        while True:
            item = self._queue.get()
            if item is None:
                break
            # False: its caller gave up (a cancelled request). It is sent all the same, since the
            # receiver takes a pair's transfers in sequence, but nobody is told how it went.
            live = item.future.set_running_or_notify_cancel()
            epoch = item.meta.epoch
            if epoch == failed_epoch:
                if live:
                    item.future.set_exception(
                        KvTransferError(f"pair {self.pair_name}: group torn down by an earlier failure")
                    )
                continue
            try:
                if group_epoch != epoch:
                    if group is not None:
                        group.abort()
                    group, store, group_epoch = None, None, None
                    store = self._announce(epoch)
                    group = PairGroup(store, SENDER_RANK, self.device, self.timeout_s, self.local_host)
                    group_epoch = epoch
                if item.ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(item.ready)
                store.queue_push(HEADER_QUEUE, item.meta.header_json())
                group.send(item.flat)
                if live:
                    item.future.set_result(item.meta)
            except Exception as e:
                err = e if isinstance(e, KvTransferError) else KvTransferError(f"pair {self.pair_name}: {e}")
                log.warning("kv send failed on pair %s epoch %s: %s", self.pair_name, epoch, err)
                failed_epoch = epoch
                if group is not None:
                    group.abort()
                group, store, group_epoch = None, None, None
                with self._lock:
                    if self._epoch == epoch:
                        self._epoch = None  # the next submit starts a fresh group
                # only now: a caller that retries at once must land in the new epoch
                if live:
                    item.future.set_exception(err)
        if group is not None:
            group.abort()
        while True:  # fail what close() left behind
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(KvTransferError(f"sender for pair {self.pair_name} closed"))

    def _announce(self, epoch: str) -> dist.Store:
        client = connect_store(self.host, self.port, self.timeout_s)
        hello = {"pair_name": self.pair_name, "epoch": epoch, "backend": self.backend}
        client.queue_push(ANNOUNCE_QUEUE, json.dumps(hello))
        return dist.PrefixStore(epoch_prefix(epoch), client)


class KvSenderPool:
    """The prefill worker's senders, one per (receiver address, pair name), reused across requests."""

    def __init__(
        self,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        host: str | None = None,
    ):
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.host = host
        self._lock = threading.Lock()
        self._senders: dict[tuple[str, str], CollectiveKvSender] = {}

    def get(self, address: str, pair_name: str) -> CollectiveKvSender:
        key = (address, pair_name)
        with self._lock:
            sender = self._senders.get(key)
            if sender is None:
                sender = CollectiveKvSender(
                    address, pair_name, device=self.device, timeout_s=self.timeout_s, host=self.host
                )
                self._senders[key] = sender
            return sender

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            sender.close()
