"""Reusable host receive buffers for the collective transport.

A fresh multi-megabyte host tensor is mmap'ed memory: every page faults on first touch,
and on a VM that costs more than the copy itself (on the 2-core dev VM, `clone()` of a
64 MiB tensor runs at ~1 GB/s, `copy_` into warm memory at ~8 GB/s). The receiver therefore takes its
buffers from this pool and gets them back when the last tensor viewing one is freed:
the tensor's storage keeps a numpy view alive, and a `weakref.finalize` on that view
returns the underlying array. Callers need do nothing; a tensor they keep simply keeps
its buffer out of the pool. CUDA tensors need none of this (the caching allocator).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

_ROUND = 1 << 20


class HostBufferPool:
    """Keeps up to `max_bytes` of idle uint8 buffers for reuse."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._idle: list[np.ndarray] = []
        self._idle_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A [nbytes] uint8 CPU tensor with undefined contents."""
        base = self._take_idle(nbytes)
        if base is None:
            base = np.empty(-(-max(nbytes, 1) // _ROUND) * _ROUND, dtype=np.uint8)
        view = base[:nbytes]  # the storage of the returned tensor holds this view
        weakref.finalize(view, self._give_back, base)
        return torch.from_numpy(view)

    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes

    def _take_idle(self, nbytes: int) -> np.ndarray | None:
        with self._lock:
            # the smallest idle buffer that fits, and not more than twice too big
            fits = [i for i, b in enumerate(self._idle) if nbytes <= b.nbytes <= 2 * max(nbytes, _ROUND)]
            if not fits:
                return None
            best = self._idle.pop(min(fits, key=lambda i: self._idle[i].nbytes))
            self._idle_bytes -= best.nbytes
            return best

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._idle_bytes + base.nbytes > self.max_bytes:
                return  # over the cap: let it go
            self._idle.append(base)
            self._idle_bytes += base.nbytes
