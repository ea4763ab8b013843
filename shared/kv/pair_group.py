"""A two-rank torch.distributed group for one (prefill, decode) pair.

No `init_process_group`: the group is built directly on the c10d backend classes
(`ProcessGroupGloo` / `ProcessGroupNCCL`) over a store the caller provides, the way
`torch.distributed._dist2` does it, so one process can hold any number of independent
pair groups and drop one without touching the others. The receiver (decode worker) is
rank 0, the sender (prefill worker) rank 1. The backend follows the device: gloo for
CPU tensors, nccl for CUDA tensors; the data path is the same: tensor-level send/recv.

A payload moves as segments posted at once, so that a checksum can run over segment i
while segment i+1 is on the wire. Waiting with a deadline differs per backend and lives
here: gloo's `Work.wait(timeout)` blocks and raises on timeout; an NCCL `Work.wait()`
only orders streams, so completion is polled and the communicator is aborted when the
deadline passes.

Nothing here knows gRPC, protobuf or the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.kv.errors import KvTransferError, KvTransferTimeout

RECEIVER_RANK = 0
SENDER_RANK = 1
_TAG = 0  # NCCL has no tags; order on a pair comes from one worker thread per side
_NCCL_POLL_S = 0.0005
# Payloads move as segments of this size, so that checksumming segment i overlaps the
# transfer of segment i+1; each segment is one p2p op, matched in order on the peer.
SEGMENT_BYTES = 4 << 20


def backend_for(device: torch.device | str) -> str:
    """The backend for `device`: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class PairGroup:
    """One side of a 2-rank group; build it on both sides with the same store prefix.

    The constructor blocks until the peer has joined (or `timeout_s` passes). Use it from
    one thread only: sends and receives on a pair must happen in the same order on both
    sides.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        device: torch.device | str,
        timeout_s: float,
        host: str | None = None,
    ):
        """`host`: the address gloo listens on and announces to the peer (this side's pod or host
        address, never every interface); None: gloo's default (the machine's host name)."""
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.timeout_s = timeout_s
        timeout = timedelta(seconds=timeout_s)
        try:
            if self.backend == "gloo":
                if host:
                    opts = dist.ProcessGroupGloo._Options()
                    opts._timeout = timeout
                    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
                    self._pg = dist.ProcessGroupGloo(store, rank, 2, opts)
                else:
                    self._pg = dist.ProcessGroupGloo(store, rank, 2, timeout)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                # The watchdog's timeout is a backstop only: our own deadline (below)
                # fires first and aborts the communicator.
                opts._timeout = timeout * 2 + timedelta(seconds=30)
                self._pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        except Exception as e:  # DistStoreError on timeout, DistNetworkError when the peer vanished
            raise _as_transfer_error(e, f"building {self.backend} pair group") from e
        self._aborted = False

    def send(
        self,
        flat: torch.Tensor,
        on_segment: Callable[[torch.Tensor], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Send a contiguous [nbytes] uint8 tensor to the peer; returns when it has left.

        The payload goes as consecutive segments, all posted at once; `on_segment` sees
        each one while the transport moves them (the checksum overlaps the I/O).
        """
        deadline = self._deadline(timeout_s)
        segments = _segments(flat)
        works = [self._pg.send([seg], self.peer, _TAG) for seg in segments]
        if on_segment is not None:
            for seg in segments:
                on_segment(seg)
        for work in works:
            self._wait(work, deadline, "send")

    def recv(
        self,
        flat: torch.Tensor,
        on_segment: Callable[[torch.Tensor], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Receive into a contiguous [nbytes] uint8 tensor of exactly the sent size.

        `on_segment` sees each segment as soon as it has arrived, while later ones are
        still on the wire.
        """
        deadline = self._deadline(timeout_s)
        segments = _segments(flat)
        works = [self._pg.recv([seg], self.peer, _TAG) for seg in segments]
        for seg, work in zip(segments, works, strict=True):
            self._wait(work, deadline, "recv")
            if on_segment is not None:
                on_segment(seg)

    def abort(self) -> None:
        """Drop the connections; pending and later operations on this group fail."""
        if self._aborted:
            return
        self._aborted = True
        try:
            self._pg.abort()
        except Exception:  # an already broken group may refuse; it is dropped either way
            pass

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def _wait(self, work: dist.Work, deadline: float, what: str) -> None:
        try:
            if self.backend == "gloo":
                # gloo raises on timeout; a zero timeout would mean "the default" (30 min)
                remaining = max(deadline - time.monotonic(), 0.001)
                work.wait(timedelta(seconds=remaining))
                return
            while not work.is_completed():
                if time.monotonic() > deadline:
                    self.abort()
                    raise KvTransferTimeout(f"nccl {what} did not complete within {self.timeout_s:.1f}s")
                time.sleep(_NCCL_POLL_S)
            work.wait()  # raises the op's error, if any; orders the current stream after it
        except KvTransferError:
            raise
        except Exception as e:
            raise _as_transfer_error(e, f"{self.backend} {what}") from e


def _segments(flat: torch.Tensor) -> list[torch.Tensor]:
    # flat: [nbytes] uint8 -> views of at most SEGMENT_BYTES each (a multiple of 4)
    return [flat[i : i + SEGMENT_BYTES] for i in range(0, flat.numel(), SEGMENT_BYTES)]


def _as_transfer_error(e: Exception, what: str) -> KvTransferError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "timed out" in msg.lower() or "timeout" in msg.lower():
        return KvTransferTimeout(f"{what}: {msg}")
    return KvTransferError(f"{what}: {msg}")
