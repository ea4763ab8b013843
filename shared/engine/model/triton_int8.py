"""Weight-only int8 matmul for CUDA in Triton: y = x @ (q * scale[:, None]).T.

Each program computes a [BLOCK_M, BLOCK_N] tile of y: it loads int8 weight tiles [BLOCK_K, BLOCK_N],
converts them to x's dtype in registers, accumulates x_tile @ w_tile in float32 with tl.dot, and
applies the per-channel scale once at the end (the scale is constant along K). The weight is read
from memory as int8: half the bytes of bfloat16, which is what bounds decode.

Importing this module needs Triton; `quant.int8_linear` falls back to the dequantized matmul
without it. Tests run the kernel with TRITON_INTERPRET=1 on CPU; on a GPU, tests/gpu runs it natively.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K,
                        stride_xm, stride_xk, stride_qn, stride_qk, stride_ym, stride_yn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BM, BK]
        w = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None] * stride_qk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # [BK, BN] int8
        acc += tl.dot(x, w.to(x.dtype))
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0)  # [BN] float32
    y = acc * scale[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (float16 / bfloat16 / float32), q: [N, K] int8, scale: [N] float32 -> [M, N] in x's dtype."""
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _int8_matmul_kernel[grid](x, q, scale, y, m, n, k, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
                              y.stride(0), y.stride(1), BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64)
    return y
