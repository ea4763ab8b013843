"""8-bit KV cache formats: each head row of a token as 8-bit elements plus shared scales.

Layout (the OCP Microscaling "MX" arrangement): the head_dim elements of one token's head
are cut into groups of 32; each group shares one power-of-two scale stored as an E8M0 byte
(2**(byte - 127)). One head row in the cache is `head_dim` element bytes followed by
`head_dim / 32` scale bytes, so a cache of [..., Hkv, D] float values becomes
[..., Hkv, D + D / 32] bytes: 1.03 bytes per element against 2 for bfloat16 (1.94x the tokens
in the same memory), whatever the head size.

- "fp8": elements are float8 e4m3 (max 448); the scale makes the group's largest magnitude
  fit. Stored in a uint8 tensor.
- "int8": elements are int8 in [-127, 127]; the scale is the smallest power of two with
  amax / scale <= 127. Stored in an int8 tensor.

The storage dtype tells the formats apart (uint8: fp8, int8: int8), so a packed tensor
carries its format with it (the KV transport names them "fp8" and "int8").

Scales per token and group are written with the token, so a block is never re-quantized
when later tokens arrive, and the bytes of a token do not depend on its neighbours: prefix
caching, chunked prefill and transfer see the same bytes whichever way a token got there.
Knows nothing about blocks or attention beyond the row layout.
"""

from __future__ import annotations

import torch

GROUP = 32  # elements per scale
FORMATS = {"fp8": torch.uint8, "int8": torch.int8}
_FORMAT_OF = {v: k for k, v in FORMATS.items()}
_FP8_MAX = 448.0
_INT8_MAX = 127.0


def is_packed(dtype: torch.dtype) -> bool:
    """Whether a cache of this dtype holds packed 8-bit rows (else plain float rows)."""
    return dtype in _FORMAT_OF


def format_of(dtype: torch.dtype) -> str:
    return _FORMAT_OF[dtype]


def packed_width(head_dim: int) -> int:
    """Bytes of one packed head row."""
    if head_dim % GROUP:
        raise ValueError(f"an 8-bit KV cache needs head_dim divisible by {GROUP}, got {head_dim}")
    return head_dim + head_dim // GROUP


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x: [..., D] float -> packed [..., D + D/32] (uint8 for fp8, int8 for int8)."""
    d = x.shape[-1]
    packed_width(d)
    g = x.float().reshape(*x.shape[:-1], d // GROUP, GROUP)  # [..., G, 32]
    amax = g.abs().amax(-1)  # [..., G]
    # smallest power of two 2**e with amax / 2**e <= top, from the exact exponent of amax / top
    # (times the float32 reciprocal of top, as the C++ writer computes it); e in [-126, 126]
    # keeps 2**e and 2**-e normal floats, built from their bits so they are exact
    inv_top = torch.tensor(1.0 / (_FP8_MAX if fmt == "fp8" else _INT8_MAX), dtype=torch.float32)
    mant, ex = torch.frexp(amax * inv_top)
    e = torch.where(mant == 0.5, ex - 1, ex).clamp(-126, 126)
    scaled = g * _pow2(-e)[..., None]
    if fmt == "fp8":
        elems = scaled.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    elif fmt == "int8":
        elems = scaled.round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8).view(torch.uint8)
    else:
        raise ValueError(f"unknown 8-bit KV format {fmt!r}; expected one of {sorted(FORMATS)}")
    scale_bytes = (e + 127).to(torch.uint8)  # E8M0: 2**(byte - 127)
    out = torch.cat((elems.reshape(*x.shape[:-1], d), scale_bytes), dim=-1)
    return out.view(FORMATS[fmt])


def dequantize(packed: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """packed [..., D + D/32] -> [..., D] in `dtype` (the values the CPU kernel computes with)."""
    raw = packed.view(torch.uint8)
    elems = raw[..., :head_dim]
    scales = _pow2(raw[..., head_dim:].to(torch.int32) - 127)  # [..., G]
    if packed.dtype == torch.uint8:
        vals = elems.contiguous().view(torch.float8_e4m3fn).float()
    else:
        vals = elems.contiguous().view(torch.int8).float()
    vals = vals.reshape(*vals.shape[:-1], head_dim // GROUP, GROUP) * scales[..., None]
    return vals.reshape(*packed.shape[:-1], head_dim).to(dtype)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0 ** e for integer e in [-126, 127], exact (float32 from its exponent bits)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)
