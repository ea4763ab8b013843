"""Transparent huge pages for large CPU tensors (Linux).

The KV cache is read one block at a time, and a sequence's blocks lie anywhere in a cache of
hundreds of MB: with 4 KiB pages nearly every block read is a TLB miss (a costly page walk,
more so under virtualization). Most kernels ship THP in `madvise` mode, so a process has to ask
for huge pages on the range before it touches the memory; this module does that.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

log = logging.getLogger(__name__)

_HUGE = 2 << 20  # 2 MiB, the x86-64 and arm64 THP size
_MADV_HUGEPAGE = 14


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros on CPU, backed by huge pages where the OS grants them (same result otherwise)."""
    t = torch.empty(shape, dtype=dtype)
    if sys.platform.startswith("linux") and t.numel() * t.element_size() >= 2 * _HUGE:
        _advise(t.data_ptr(), t.numel() * t.element_size())
    return t.zero_()  # first touch: the kernel now backs the range with huge pages


def _advise(ptr: int, size: int) -> None:
    start = (ptr + _HUGE - 1) & ~(_HUGE - 1)
    end = (ptr + size) & ~(_HUGE - 1)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(start, end - start, _MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:  # no libc symbol: keep normal pages
        log.debug("no madvise: %s", e)
