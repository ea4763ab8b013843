"""Reference paged attention for kernel tests: each sequence's context gathered from its block
table, causal (+ sliding window) mask at its offset, SDPA in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_tables(ctx_lens: list[int], num_blocks: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """Each sequence gets its own blocks, scattered over the cache; rows padded with 0 (int32)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    need = [-(-c // block_size) for c in ctx_lens]
    width = max(need)
    rows, i = [], 0
    for n in need:
        rows.append(perm[i: i + n] + [0] * (width - n))
        i += n
    if i > num_blocks:
        raise ValueError(f"{i} blocks needed, the cache has {num_blocks}")
    return torch.tensor(rows, dtype=torch.int32)


def reference(q, k_cache, v_cache, tables, ctx_lens, q_lens, scale, window=None, k_scale=None, v_scale=None):
    """q: [sum(q_lens), Hq, D]; caches [num_blocks, block_size, Hkv, D] -> [sum(q_lens), Hq, D] float32."""
    bs = k_cache.shape[1]
    outs, start = [], 0
    for i, (c, n) in enumerate(zip(ctx_lens, q_lens, strict=True)):
        blocks = tables[i, : -(-c // bs)].long()
        k = k_cache[blocks].float()
        v = v_cache[blocks].float()
        if k_scale is not None:
            k = k * k_scale[blocks][:, None, :, None]
            v = v * v_scale[blocks][:, None, :, None]
        k, v = k.flatten(0, 1)[:c], v.flatten(0, 1)[:c]
        qs = q[start: start + n].float()
        q_pos = torch.arange(c - n, c)[:, None]
        k_pos = torch.arange(c)[None, :]
        mask = k_pos <= q_pos
        if window:
            mask &= q_pos - k_pos < window
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs)
