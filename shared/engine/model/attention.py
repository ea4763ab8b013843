"""Attention over a paged KV cache, for a flattened batch of sequences.

The batch is a mix of prefill chunks (many query tokens per sequence) and decodes (one
query token per sequence). Keys and values of the new tokens are written into the cache
slots first; then each query attends to its sequence's cached context through the block table.
Knows nothing about scheduling or sampling.

Two paths, chosen by the runner through the metadata it builds:
- CUDA (`AttentionMetadata.gpu` set): the Triton kernels of triton_attention.py, two launches
  per layer whatever the batch (all prefill-like sequences in one varlen launch, all decodes in
  one split-K decode launch), reading K/V in place.
- otherwise (CPU): decode groups through the C++ kernel (cpu_kernels.py), prefills through SDPA
  over each sequence's gathered context.

A cache may hold packed 8-bit rows (kv_quant.py): new keys/values are quantized as they are
written; the CPU decode kernel reads the packed rows in place, and the other paths dequantize
only what they gather (one sequence's context), never the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_kernels, kv_quant


@dataclass
class PrefillSeq:
    query_start: int  # offset of this sequence's first new token in the flat batch
    query_len: int
    context_len: int  # tokens in the cache after this step (cached + new)
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass
class DecodeGroup:
    """Decodes of similar context length, attended together (padding only to the group's max)."""

    query_start: int  # offset of the group's first token in the flat batch; one token per sequence
    block_tables: torch.Tensor  # [B, max_blocks] int64 (padded with 0)
    context_lens: torch.Tensor  # [B] int64
    max_context: int


@dataclass
class GpuBatch:
    """The batch as the Triton kernels read it: `num_prefill_tokens` tokens of sequences with
    any number of new tokens (prefill chunks, speculative verification), then one token per
    decode. Index tensors are int32 on the device; None where that part is empty."""

    num_prefill_tokens: int
    max_q_len: int = 0
    cu_q_lens: torch.Tensor | None = None  # [Np + 1] query offsets of the prefill part
    prefill_context_lens: torch.Tensor | None = None  # [Np] tokens in the cache after this step
    prefill_block_tables: torch.Tensor | None = None  # [Np, max_blocks]
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [Bd]
    num_splits: int = 1  # split-K parts of the decode kernel (fixed per captured CUDA graph)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of every new token
    prefills: list[PrefillSeq]
    decodes: list[DecodeGroup]
    sliding_window: int | None = None
    gpu: GpuBatch | None = None  # set: the Triton path (prefills/decodes are then empty)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k_cache: [num_blocks, block_size, Hkv, D] (packed: [..., Hkv, D + D/32]); k: [T, Hkv, D]
    if kv_quant.is_packed(k_cache.dtype):
        if cpu_kernels.supports(k.device, k.dtype):
            cpu_kernels.load().write_kv_packed(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping)
            return
        fmt = kv_quant.format_of(k_cache.dtype)
        k, v = kv_quant.quantize(k, fmt), kv_quant.quantize(v, fmt)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> out [T, Hq, D]. The cache already holds this step's keys/values."""
    if meta.gpu is not None:
        return _triton_attention(q, k_cache, v_cache, meta.gpu, scale, meta.sliding_window)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for seq in meta.prefills:
        q_s = q[seq.query_start: seq.query_start + seq.query_len]  # [S, Hq, D]
        k_s = _read(k_cache, seq.block_table, seq.context_len, q)  # [C, Hkv, D]
        v_s = _read(v_cache, seq.block_table, seq.context_len, q)
        start = seq.context_len - seq.query_len
        q_pos = torch.arange(start, seq.context_len, device=q.device)
        mask = None
        if start > 0 or meta.sliding_window is not None:
            k_pos = torch.arange(seq.context_len, device=q.device)
            mask = _mask(q_pos[:, None], k_pos[None, :], meta.sliding_window)  # [S, C]
        # 4-D inputs: with 3-D ones torch falls back from its flash CPU kernel to the slow math path
        o = F.scaled_dot_product_attention(
            q_s.transpose(0, 1)[None], k_s.transpose(0, 1)[None], v_s.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )  # [1, Hq, S, D]
        out[seq.query_start: seq.query_start + seq.query_len] = o[0].transpose(0, 1)
    for group in meta.decodes:
        b, nb = group.block_tables.shape
        q_d = q[group.query_start: group.query_start + b]  # [B, Hq, D]
        if cpu_kernels.usable(q_d):  # reads each block in place: no gathered copy
            out[group.query_start: group.query_start + b] = cpu_kernels.decode_attention(
                q_d, k_cache, v_cache, group.block_tables, group.context_lens, scale, meta.sliding_window)
            continue
        ids, slots = group.block_tables.view(-1), b * nb * block_size
        k_d = _read(k_cache, ids, slots, q).view(b, nb * block_size, k_cache.shape[2], q.shape[2])
        v_d = _read(v_cache, ids, slots, q).view(b, nb * block_size, k_cache.shape[2], q.shape[2])
        k_d, v_d = k_d[:, : group.max_context], v_d[:, : group.max_context]  # [B, C, Hkv, D]
        k_pos = torch.arange(group.max_context, device=q.device)[None, :]  # [1, C]
        q_pos = (group.context_lens - 1)[:, None]  # [B, 1]
        mask = _mask(q_pos, k_pos, meta.sliding_window)[:, None, None, :]  # [B, 1, 1, C]
        o = F.scaled_dot_product_attention(
            q_d[:, :, None, :], k_d.transpose(1, 2), v_d.transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )  # [B, Hq, 1, D]
        out[group.query_start: group.query_start + b] = o[:, :, 0, :]
    return out


def _triton_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: GpuBatch, scale: float,
                      window: int | None) -> torch.Tensor:
    global _triton
    if _triton is None:  # imported on first use: CPU engines never load Triton
        from . import triton_attention as _triton
    out = torch.empty_like(q)
    n = g.num_prefill_tokens
    if g.cu_q_lens is not None:
        _triton.varlen_attention(q[:n], k_cache, v_cache, g.cu_q_lens, g.prefill_context_lens,
                                          g.prefill_block_tables, g.max_q_len, scale, window, out=out[:n])
    if g.decode_block_tables is not None:
        _triton.decode_attention(q[n:], k_cache, v_cache, g.decode_block_tables, g.decode_context_lens,
                                          scale, window, num_splits=g.num_splits, block_n=DECODE_BLOCK_N,
                                          out=out[n:])
    return out


DECODE_BLOCK_N = 32  # keys per tile of the decode kernel on the GPU
_triton = None  # the triton_attention module, once a GPU batch needed it


def _read(cache: torch.Tensor, block_ids: torch.Tensor, length: int, q: torch.Tensor) -> torch.Tensor:
    """The context as [length, Hkv, D] in q's dtype (packed rows dequantized after the gather)."""
    rows = _gather(cache, block_ids, length)
    return kv_quant.dequantize(rows, q.shape[-1], q.dtype) if kv_quant.is_packed(cache.dtype) else rows


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Blocks -> one contiguous [length, H, D] run. index_select on a 2-D view copies whole
    blocks as rows, several times faster on CPU than advanced indexing."""
    rows = cache.view(cache.shape[0], -1).index_select(0, block_ids)  # [nb, bs * H * D]
    return rows.view(-1, *cache.shape[2:])[:length]


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    return allowed
