"""Attention over a paged KV cache, for a flattened batch of sequences.

The batch is a mix of prefill chunks (many query tokens per sequence) and decodes (one
query token per sequence). Keys and values of the new tokens are written into the cache
slots first; then each query attends to its sequence's cached context, gathered from the
block table. Knows nothing about scheduling or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    query_start: int  # offset of this sequence's first new token in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this step (cached + new)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    prefills: list[PrefillSeq]
    # Decodes are the last `num_decodes` tokens of the flat batch, one per sequence.
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor | None  # [B] int64
    decode_max_context: int
    sliding_window: int | None = None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k_cache: [num_blocks, block_size, Hkv, D]; k: [T, Hkv, D]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> out [T, Hq, D]. The cache already holds this step's keys/values."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for seq in meta.prefills:
        q_s = q[seq.query_start: seq.query_start + seq.query_len]  # [S, Hq, D]
        k_s = _gather(k_cache, seq.block_table, seq.context_len)  # [C, Hkv, D]
        v_s = _gather(v_cache, seq.block_table, seq.context_len)
        start = seq.context_len - seq.query_len
        q_pos = torch.arange(start, seq.context_len, device=q.device)
        mask = None
        if start > 0 or meta.sliding_window is not None:
            k_pos = torch.arange(seq.context_len, device=q.device)
            mask = _mask(q_pos[:, None], k_pos[None, :], meta.sliding_window)  # [S, C]
        o = F.scaled_dot_product_attention(
            q_s.transpose(0, 1), k_s.transpose(0, 1), v_s.transpose(0, 1),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )  # [Hq, S, D]
        out[seq.query_start: seq.query_start + seq.query_len] = o.transpose(0, 1)
    if meta.num_decodes:
        b = meta.num_decodes
        q_d = q[q.shape[0] - b:]  # [B, Hq, D]
        bt = meta.decode_block_tables  # [B, nb]
        nb = bt.shape[1]
        k_d = k_cache[bt].view(b, nb * block_size, *k_cache.shape[2:])[:, : meta.decode_max_context]
        v_d = v_cache[bt].view(b, nb * block_size, *v_cache.shape[2:])[:, : meta.decode_max_context]
        k_pos = torch.arange(meta.decode_max_context, device=q.device)[None, :]  # [1, C]
        q_pos = (meta.decode_context_lens - 1)[:, None]  # [B, 1]
        mask = _mask(q_pos, k_pos, meta.sliding_window)[:, None, None, :]  # [B, 1, 1, C]
        o = F.scaled_dot_product_attention(
            q_d[:, :, None, :], k_d.transpose(1, 2), v_d.transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )  # [B, Hq, 1, D]
        out[q.shape[0] - b:] = o[:, :, 0, :]
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    blocks = cache[block_table]  # [nb, bs, H, D]
    return blocks.view(-1, *cache.shape[2:])[:length]


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    return allowed
