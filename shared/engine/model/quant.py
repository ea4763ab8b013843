"""Int8 weights: per-output-channel symmetric scales, quantized when the weights load.

A linear layer's weight W [N, K] becomes Q = round(W / s) in int8 with s[n] = max_k |W[n, k]| / 127,
so W ~= Q * s[:, None]; the weight stays int8 in memory and the matmul reads it as such:
- CPU, up to 4 rows in half precision (decode of a few sequences, bound by weight bytes):
  `torch.ops.aten._weight_int8pack_mm`, torch's weight-only kernel; activations stay as they are.
- CPU, more rows (batched decode, prefill; bound by arithmetic): each activation row is also
  rounded to int8 with its own scale (`quantize_rows`) and the product runs int8 x int8 -> int32
  on the CPU's VNNI dot-product instructions, which do twice the multiply-adds per instruction
  of the bf16 ones (the C++ `int8_linear` in cpu_kernels; `_int8_rows_mm` is the same arithmetic
  in torch ops). llama.cpp's q8 activations and IPEX's int8 low-precision mode work the same
  way; the added rounding is at most half an activation step per element, and
  `make bench-quant` reports its effect on perplexity.
- CUDA: a Triton kernel that multiplies with the int8 tile dequantized in registers
  (`triton_int8.py`, when Triton is installed); activations stay as they are.
- elsewhere: F.linear with the dequantized weight (the reference; tests compare with it).

A tied embedding is quantized the same way (one scale per token row), so a tied model keeps
a single int8 table for the lookup and the logits.
Knows nothing about checkpoints (the loader calls `quantize_weight`) or about the rest of the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

QUANTIZATIONS = ("none", "int8")
PACK_MM_MAX_ROWS = 4  # torch's weight-only kernel is the fastest up to here (tools/bench/quant.py)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (int8 [N, K], float32 scales [N]); symmetric, per output channel."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """nn.Linear's interface over an int8 weight; `weight` keeps the checkpoint's name."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight, self.weight_scale)
        return y if self.bias is None else y + self.bias


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., K] -> [..., N] = x @ (q * scale[:, None]).T, in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.device.type == "cpu":
        out = _cpu(x2, q, scale)
    elif x.device.type == "cuda" and (tri := _triton()) is not None:
        out = tri.int8_matmul(x2, q, scale)
    else:
        out = F.linear(x2, dequantize_weight(q, scale, x.dtype))
    return out.view(*shape[:-1], q.shape[0])


def _cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # torch's kernel reads K in blocks of 16: other widths give garbage (torch 2.13)
    if x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= PACK_MM_MAX_ROWS and x.shape[1] % 16 == 0:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale.to(x.dtype))
    kernels = cpu_kernels.load()
    if kernels is None:
        return _int8_rows_mm(x, q, scale)
    return kernels.int8_linear(x.contiguous(), q, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (int8 [M, K], float32 scales [M, 1]); symmetric, one scale per row (token)."""
    xf = x.float()
    s = (xf.abs().amax(dim=1, keepdim=True) * (1.0 / 127.0)).clamp(min=1e-12)
    return torch.round(xf * (1.0 / s)).clamp(-127, 127).to(torch.int8), s


def _int8_rows_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row of x quantized to int8 with its own scale, then an int8 x int8 -> int32 matmul
    (oneDNN on the CPU's VNNI dot-product instructions) scaled back by row and channel scales."""
    xq, xs = quantize_rows(x)
    acc = torch._int_mm(xq, q.t())
    return (acc.float() * xs * scale).to(x.dtype)


_TRITON = None


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_int8

            _TRITON = triton_int8
        except ImportError:
            _TRITON = False
    return _TRITON or None


class Int8Embedding(nn.Module):
    """An embedding table as int8 rows with one scale each (also the tied LM head's weight)."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(num_embeddings), requires_grad=False)
        self.dtype = dtype  # of the looked-up rows (the model's dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.index_select(0, ids).float() * self.weight_scale.index_select(0, ids)[:, None]
        return rows.to(self.dtype)


def prepare(model: nn.Module, dtype: torch.dtype) -> None:
    """After `model.to(dtype)`: scales back to float32 (a bfloat16 scale would add its own rounding),
    and int8 embeddings return rows of the model's dtype."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Embedding)):
            m.weight_scale.data = m.weight_scale.data.float()
        if isinstance(m, Int8Embedding):
            m.dtype = dtype


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (weights as stored)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
