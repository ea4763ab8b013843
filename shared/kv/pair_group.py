"""A two-rank torch.distributed group for one (prefill, decode) pair.

No `init_process_group`: the group is built directly on the c10d backend classes
(`ProcessGroupGloo` / `ProcessGroupNCCL`) over a store the caller provides, the way
`torch.distributed._dist2` does it, so one process can hold any number of independent
pair groups and drop one without touching the others. The receiver (decode worker) is
rank 0, the sender (prefill worker) rank 1. The backend follows the device: gloo for
CPU tensors, nccl for CUDA tensors; the data path is the same: tensor-level send/recv.

Waiting with a deadline differs per backend and lives here: gloo's `Work.wait(timeout)`
blocks and raises on timeout; an NCCL `Work.wait()` only orders streams, so completion
is polled and the communicator is aborted when the deadline passes.

Nothing here knows gRPC, protobuf or the engine.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from shared.kv.errors import KvTransferError, KvTransferTimeout

RECEIVER_RANK = 0
SENDER_RANK = 1
_TAG = 0  # NCCL has no tags; order on a pair comes from one worker thread per side
_NCCL_POLL_S = 0.0005


def backend_for(device: torch.device | str) -> str:
    """The backend for `device`: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class PairGroup:
    """One side of a 2-rank group; build it on both sides with the same store prefix.

    The constructor blocks until the peer has joined (or `timeout_s` passes). Use it from
    one thread only: sends and receives on a pair must happen in the same order on both
    sides.
    """

    def __init__(self, store: dist.Store, rank: int, device: torch.device | str, timeout_s: float):
        self.rank = rank
        self.peer = 1 - rank
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.timeout_s = timeout_s
        timeout = timedelta(seconds=timeout_s)
        try:
            if self.backend == "gloo":
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

    def send(self, flat: torch.Tensor, timeout_s: float | None = None) -> None:
        """Send a contiguous 1-D tensor to the peer; returns when it has left."""
        self._wait(self._pg.send([flat], self.peer, _TAG), timeout_s, "send")

    def recv(self, flat: torch.Tensor, timeout_s: float | None = None) -> None:
        """Receive into a contiguous 1-D tensor of exactly the sent size."""
        self._wait(self._pg.recv([flat], self.peer, _TAG), timeout_s, "recv")

    def abort(self) -> None:
        """Drop the connections; pending and later operations on this group fail."""
        if self._aborted:
            return
        self._aborted = True
        try:
            self._pg.abort()
        except Exception:  # an already broken group may refuse; it is dropped either way
            pass

    def _wait(self, work: dist.Work, timeout_s: float | None, what: str) -> None:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            if self.backend == "gloo":
                work.wait(timedelta(seconds=timeout_s))
                return
            deadline = time.monotonic() + timeout_s
            while not work.is_completed():
                if time.monotonic() > deadline:
                    self.abort()
                    raise KvTransferTimeout(f"nccl {what} did not complete within {timeout_s:.1f}s")
                time.sleep(_NCCL_POLL_S)
            work.wait()  # raises the op's error, if any; orders the current stream after it
        except KvTransferError:
            raise
        except Exception as e:
            raise _as_transfer_error(e, f"{self.backend} {what}") from e


def _as_transfer_error(e: Exception, what: str) -> KvTransferError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "timed out" in msg.lower() or "timeout" in msg.lower():
        return KvTransferTimeout(f"{what}: {msg}")
    return KvTransferError(f"{what}: {msg}")
