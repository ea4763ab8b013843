"""Paged attention kernels in Triton, for the engine on CUDA.

Both kernels read keys and values in place from the engine's KV cache (one layer's
[num_blocks, block_size, kv_heads, head_dim] view of [layers, 2, blocks, ...]), locating each
token's row through the sequence's block table: no gathered copy of the context. Arithmetic is
float32 (online softmax); the outputs have the queries' dtype.

- `decode_attention`: one query token per sequence. One program per (sequence, KV head,
  split): the G query heads sharing a KV head are read together (grouped-query attention, one
  pass over the keys for all of them), and a long context is cut into `num_splits` parts run
  in parallel (split-K, "flash decoding"), merged by a second small kernel. The split count is
  fixed by the caller, not by the context lengths, and every length is read from a tensor: a
  CUDA graph captured once replays for any context (shared/engine/cuda_graphs.py).
- `varlen_attention`: many sequences with any number of new tokens each, in one launch
  (prefill, chunked prefill, speculative verification: several query tokens of one sequence).
  Query i of a sequence with `q_len` new tokens and `ctx_len` tokens in the cache sits at
  position ctx_len - q_len + i and attends causally to everything cached before it.

Both take an optional sliding window (a query at position p sees keys at p - window + 1 .. p).

Dequantize-on-load hook (8-bit KV caches): `k_scale` / `v_scale`, float32 tensors
[num_blocks, kv_heads] of one layer (one scale per block and KV head), are optional arguments of
both functions. When given, every key/value tile is converted to float32, multiplied by its
block's scale and cast to the queries' dtype before the dot products (`_load_kv` below, the one
place that reads the cache); without them the cache is read as it is and the scaled path is
compiled out (a `tl.constexpr` flag). The cache tensor may then hold int8 or float8 values.

Packed 8-bit rows (the engine's TANDEM_KV_CACHE_DTYPE=fp8|int8, model/kv_quant.py): a cache of
uint8 (fp8 e4m3 elements) or int8 whose rows are head_dim element bytes followed by head_dim / 32
E8M0 scale bytes is read in place too (`PACKED` 1 or 2): each element is decoded with integer
ops (fp8 through float16's bit layout, as the C++ kernel does) and multiplied by its group's
power of two.

Import with TRITON_INTERPRET=1 set to run the kernels on CPU tensors with Triton's interpreter
(what the unit tests do); the flag is read when the kernels are defined, i.e. on import.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU engine does not need Triton
    triton = None


def _interpreted() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Under Triton's interpreter (numpy), tl.dot of half types gives wrong results: the kernels then
# compute the dot products in float32 (flag UPCAST); compiled for a GPU they use the tensor cores.
INTERPRETED = triton is not None and _interpreted()


def available() -> bool:
    return triton is not None


if triton is not None:
    # running max before any key: finite, so fully masked rows never produce NaN (a constexpr:
    # compiled kernels may only read constexpr globals)
    NEG = tl.constexpr(-1.0e30)

    @triton.jit
    def _load_kv(cache, scale, blk, tok_off, h, offs_d, t_ok, d_ok, stride_blk, stride_tok, stride_h,
                 kv_heads, SCALED: tl.constexpr, PACKED: tl.constexpr = 0, HEAD_DIM: tl.constexpr = 0):
        """[N, D] rows of one KV head for tokens at (block blk, offset tok_off): as stored, or
        dequantized to float32 when SCALED or PACKED (1: fp8 rows, 2: int8 rows, with E8M0 scales)."""
        row = cache + blk[:, None] * stride_blk + tok_off[:, None] * stride_tok + h * stride_h
        mask = t_ok[:, None] & d_ok[None, :]
        if PACKED:  # one return below: a compiled function's branches must agree on its type
            b = tl.load(row + offs_d[None, :], mask=mask, other=0).to(tl.uint8, bitcast=True).to(tl.int32)
            e = tl.load(row + HEAD_DIM + offs_d[None, :] // 32, mask=mask, other=127)
            e = e.to(tl.uint8, bitcast=True).to(tl.int32)
            if PACKED == 1:  # e4m3 -> float16 bits of 2^-8 times the value; the 2^8 joins the scale
                h16 = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16)
                x = h16.to(tl.float16, bitcast=True).to(tl.float32)
                e = e + 8
            else:
                x = (b - ((b & 0x80) << 1)).to(tl.float32)  # two's complement of the byte
            x = x * (e << 23).to(tl.float32, bitcast=True)
        else:
            x = tl.load(row + offs_d[None, :], mask=mask, other=0.0)
            if SCALED:  # dequantize: one float32 scale per (block, KV head)
                s = tl.load(scale + blk * kv_heads + h, mask=t_ok, other=0.0)
                x = x.to(tl.float32) * s[:, None]
        return x

    @triton.jit
    def _decode_split_kernel(
        q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
        part_acc, part_max, part_sum,
        scale, window,
        stride_qb, stride_qh, stride_blk, stride_tok, stride_h, stride_bt,
        kv_heads,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        SCALED: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, PACKED: tl.constexpr = 0,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(context_lens + b).to(tl.int32)
        first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
        n_tiles = (ctx - first + BLOCK_N - 1) // BLOCK_N
        per_split = (n_tiles + NUM_SPLITS - 1) // NUM_SPLITS * BLOCK_N
        lo = first + split * per_split
        hi = tl.minimum(lo + per_split, ctx)

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        g_ok = offs_g < GROUP
        heads = h * GROUP + offs_g
        qv = tl.load(q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                     mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            qv = qv.to(tl.float32)
        dtype = qv.dtype

        m_i = tl.full([GROUP_PAD], NEG, tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            t_ok = tok < hi
            blk = tl.load(block_tables + b * stride_bt + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
            k = _load_kv(k_cache, k_scale, blk, tok % BLOCK_SIZE, h, offs_d, t_ok, d_ok, stride_blk, stride_tok,
                         stride_h, kv_heads, SCALED, PACKED, HEAD_DIM).to(dtype)
            s = tl.dot(qv, tl.trans(k), input_precision=PRECISION) * scale  # [G, N]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = _load_kv(v_cache, v_scale, blk, tok % BLOCK_SIZE, h, offs_d, t_ok, d_ok, stride_blk, stride_tok,
                         stride_h, kv_heads, SCALED, PACKED, HEAD_DIM).to(dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        # partials: [B, Hq, NUM_SPLITS] (+ [D]); the accumulator is not yet divided by the sum
        row = (b * kv_heads * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_max + row, m_i, mask=g_ok)
        tl.store(part_sum + row, l_i, mask=g_ok)
        tl.store(part_acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _decode_merge_kernel(part_acc, part_max, part_sum, out, stride_ob, stride_oh, num_heads,
                             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                             SPLITS_PAD: tl.constexpr):
        b = tl.program_id(0)
        hq = tl.program_id(1)
        row = (b * num_heads + hq) * NUM_SPLITS
        offs_s = tl.arange(0, SPLITS_PAD)  # at least 2: no size-1 reductions
        s_ok = offs_s < NUM_SPLITS
        offs_d = tl.arange(0, D_PAD)
        m = tl.load(part_max + row + offs_s, mask=s_ok, other=NEG)
        l_s = tl.load(part_sum + row + offs_s, mask=s_ok, other=0.0)
        acc = tl.load(part_acc + (row + offs_s)[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        w = tl.exp(m - tl.max(m, 0))  # empty splits have m = NEG and weigh 0
        total = tl.sum(w * l_s, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out + b * stride_ob + hq * stride_oh + offs_d, o.to(out.dtype.element_ty), mask=offs_d < HEAD_DIM)

    @triton.jit
    def _varlen_kernel(
        q, k_cache, v_cache, k_scale, v_scale, out, cu_q_lens, context_lens, block_tables,
        scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_blk, stride_tok, stride_h, stride_bt,
        kv_heads,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, PACKED: tl.constexpr = 0,
    ):
        seq = tl.program_id(0)
        q_tile = tl.program_id(1)
        hq = tl.program_id(2)
        h = hq // GROUP
        q_start = tl.load(cu_q_lens + seq)
        q_len = tl.load(cu_q_lens + seq + 1) - q_start
        if q_tile * BLOCK_M < q_len:
            ctx = tl.load(context_lens + seq).to(tl.int32)
            offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, D_PAD)
            d_ok = offs_d < HEAD_DIM
            m_ok = offs_m < q_len
            q_pos = ctx - q_len + offs_m  # absolute position of each query token
            rows = (q_start + offs_m).to(tl.int64)
            qv = tl.load(q + rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                qv = qv.to(tl.float32)
            dtype = qv.dtype
            last = tl.minimum(ctx, ctx - q_len + (q_tile + 1) * BLOCK_M)  # keys past the tile's last query
            lo = tl.where(window > 0, tl.maximum(ctx - q_len + q_tile * BLOCK_M - window + 1, 0), 0)
            lo = (lo // BLOCK_N) * BLOCK_N
            m_i = tl.full([BLOCK_M], NEG, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            for start in range(lo, last, BLOCK_N):
                tok = start + tl.arange(0, BLOCK_N)
                t_ok = tok < last
                blk = tl.load(block_tables + seq * stride_bt + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
                k = _load_kv(k_cache, k_scale, blk, tok % BLOCK_SIZE, h, offs_d, t_ok, d_ok, stride_blk, stride_tok,
                             stride_h, kv_heads, SCALED, PACKED, HEAD_DIM).to(dtype)
                s = tl.dot(qv, tl.trans(k), input_precision=PRECISION) * scale  # [M, N]
                allowed = (tok[None, :] <= q_pos[:, None]) & t_ok[None, :]
                allowed = allowed & ((window <= 0) | (q_pos[:, None] - tok[None, :] < window))
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                v = _load_kv(v_cache, v_scale, blk, tok % BLOCK_SIZE, h, offs_d, t_ok, d_ok, stride_blk, stride_tok,
                             stride_h, kv_heads, SCALED, PACKED, HEAD_DIM).to(dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
                l_i = l_i * alpha + tl.sum(p, 1)
                m_i = m_new
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :], o.to(out.dtype.element_ty),
                     mask=m_ok[:, None] & d_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[int, int, bool]:
    if triton is None:
        raise RuntimeError("triton is not installed")
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    width = d + d // 32 if _packed(k_cache, d) else d
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != width or hq % hkv:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not fit queries {tuple(q.shape)}")
    if k_cache.stride(3) != 1 or q.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("head_dim must be the innermost, contiguous dimension of q and the caches")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale come together")
    if k_scale is not None and (k_scale.shape != (k_cache.shape[0], hkv) or not k_scale.is_contiguous()
                                or not v_scale.is_contiguous()):
        raise ValueError(f"scales must be contiguous [num_blocks, kv_heads] = {(k_cache.shape[0], hkv)}")
    return hq // hkv, hkv, k_scale is not None


def _packed(cache: torch.Tensor, d: int) -> int:
    """1: packed fp8 rows (uint8), 2: packed int8 rows (int8), each head_dim + head_dim / 32 bytes
    wide; 0: values as stored (an int8 cache of head_dim-wide rows takes the scale tensors)."""
    if cache.dtype not in (torch.uint8, torch.int8) or d % 32 or cache.shape[3] != d + d // 32:
        return 0
    return 1 if cache.dtype == torch.uint8 else 2


def _precision(dtype: torch.dtype) -> str:
    # float32 engines must not lose precision to TF32 tensor cores; half types are exact anyway
    return "ieee" if dtype == torch.float32 or INTERPRETED else "tf32"


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None = None, *, num_splits: int = 1,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     block_n: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D]. block_tables: [B, max_blocks] (int32/int64), context_lens: [B]
    tokens in the cache per sequence, this step's included. num_splits: a power of two."""
    group, hkv, scaled = _check(q, k_cache, v_cache, k_scale, v_scale)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    b, hq, d = q.shape
    d_pad = _next_pow2(d)
    part_acc = torch.empty((b, hq, num_splits, d_pad), dtype=torch.float32, device=q.device)
    part_max = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, part_acc, part_max, part_sum,
        scale, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        hkv,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)), HEAD_DIM=d, D_PAD=d_pad,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n, NUM_SPLITS=num_splits, SCALED=scaled,
        PACKED=0 if scaled else _packed(k_cache, d),
        PRECISION=_precision(q.dtype), UPCAST=INTERPRETED,
    )
    _decode_merge_kernel[(b, hq)](part_acc, part_max, part_sum, out, out.stride(0), out.stride(1), hq,
                                  HEAD_DIM=d, D_PAD=d_pad, NUM_SPLITS=num_splits,
                                  SPLITS_PAD=max(2, num_splits))
    return out


def varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_q_lens: torch.Tensor,
                     context_lens: torch.Tensor, block_tables: torch.Tensor, max_q_len: int, scale: float,
                     window: int | None = None, *, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D] (the new tokens of N sequences, back to back) -> [T, Hq, D].
    cu_q_lens: [N + 1] query offsets; context_lens: [N] tokens in the cache after this step;
    block_tables: [N, max_blocks]; max_q_len: the largest query length (sizes the grid)."""
    group, hkv, scaled = _check(q, k_cache, v_cache, k_scale, v_scale)
    n, hq, d = context_lens.shape[0], q.shape[1], q.shape[2]
    out = torch.empty_like(q) if out is None else out
    if n == 0 or max_q_len == 0:
        return out
    _varlen_kernel[(n, triton.cdiv(max_q_len, block_m), hq)](
        q, k_cache, v_cache, k_scale, v_scale, out, cu_q_lens, context_lens, block_tables,
        scale, window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        hkv,
        GROUP=group, HEAD_DIM=d, D_PAD=_next_pow2(d), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, SCALED=scaled, PRECISION=_precision(q.dtype), UPCAST=INTERPRETED,
        PACKED=0 if scaled else _packed(k_cache, d),
    )
    return out


def default_num_splits(batch: int, kv_heads: int, max_context: int, num_sms: int, block_n: int = 16) -> int:
    """Splits so that a decode launch fills the GPU (about two programs per SM), but no more
    splits than there are key tiles in the longest context; a power of two, at most 32."""
    want = max(1, -(-2 * num_sms // max(1, batch * kv_heads)))
    tiles = max(1, -(-max_context // block_n))
    return min(_next_pow2(min(want, tiles)), 32)
