"""The KV cache allocator: same tensor as torch.zeros, whatever pages the OS grants."""

from __future__ import annotations

import torch

from shared.engine import hugepages


def test_zeros_is_torch_zeros():
    for shape, dtype in (((3, 5), torch.float32), ((2, 2, 1 << 20), torch.float32), ((4, 1 << 20), torch.bfloat16)):
        t = hugepages.zeros(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert not t.any()
        t.fill_(1)  # writable across the whole range
        assert t.sum().item() == t.numel()
