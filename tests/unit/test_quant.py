"""Quantized kernels equal their dequantized references: the int8 linear and embedding, the 8-bit KV
write (C++ and PyTorch byte for byte), and attention over an 8-bit cache (decode kernel and the
gathering path) against float attention over the dequantized cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.engine.model import cpu_kernels, kv_quant, quant
from shared.engine.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    PrefillSeq,
    paged_attention,
    write_kv,
)

needs_kernels = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C++ toolchain to build the kernels")


def test_weight_quantization_is_symmetric_per_channel_within_half_a_step():
    w = torch.randn(48, 70) * torch.logspace(-3, 1, 48)[:, None]  # channels of very different ranges
    q, s = quant.quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and int(q.abs().max()) == 127
    err = (quant.dequantize_weight(q, s, torch.float32) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 130])  # torch's weight-only kernel (few bf16 rows) and int8 x int8
@pytest.mark.parametrize("k,n", [(64, 96), (200, 1000), (1024, 300)])
def test_int8_linear_equals_the_dequantized_reference(dtype, rows, k, n):
    g = torch.Generator().manual_seed(rows + k)
    lin = quant.Int8Linear(k, n, bias=True)
    q, s = quant.quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    lin.weight.data, lin.weight_scale.data = q, s
    lin.bias.data = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = quant.dequantize_weight(q, s, dtype).float()
    weight_only = dtype != torch.float32 and rows <= quant.PACK_MM_MAX_ROWS and k % 16 == 0
    if weight_only:
        x_used = x.float()
    else:  # each row of x rounded to int8 with its own scale first
        xq, xs = quant.quantize_rows(x)
        x_used = xq.float() * xs
    ref = F.linear(x_used, w, lin.bias.float())
    out = lin(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    # and against x unrounded: off by at most half an activation step times the weight row's L1 norm
    exact = F.linear(x.float(), w, lin.bias.float())
    half_step = x.float().abs().amax(dim=1, keepdim=True) / 127 / 2
    bound = half_step * w.abs().sum(dim=1)[None, :] + tol * exact.abs().max()
    assert bool(((out.float() - exact).abs() <= bound).all())


def test_activation_rows_are_quantized_symmetrically_within_half_a_step():
    x = torch.randn(6, 70) * torch.logspace(-3, 2, 6)[:, None]
    x[2] = 0  # an all-zero row
    xq, xs = quant.quantize_rows(x)
    assert xq.dtype == torch.int8 and xs.shape == (6, 1) and int(xq[0].abs().max()) == 127
    assert bool((xq[2] == 0).all())
    assert bool(((xq.float() * xs - x).abs() <= xs / 2 + 1e-7).all())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(20))
def test_int8_linear_kernel_and_its_torch_formula_agree(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, s = quant.quantize_weight(torch.randn(40, 64, generator=g))
    x = (torch.randn(9, 64, generator=g) * 3).to(dtype)
    kernel = cpu_kernels.load().int8_linear(x, q, s)
    formula = quant._int8_rows_mm(x, q, s)
    # the same int8 activations and int32 sums; the scaling back may round differently by one
    # unit in the last place (the kernel is built with -ffast-math), in float32 before the cast
    torch.testing.assert_close(kernel.float(), formula.float(), atol=1e-5, rtol=1e-5)


def test_int8_linear_without_the_kernels_falls_back_to_the_same_result(monkeypatch):
    q, s = quant.quantize_weight(torch.randn(40, 64))
    x = torch.randn(5, 64)
    fast = quant.int8_linear(x, q, s)
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    torch.testing.assert_close(quant.int8_linear(x, q, s), fast, atol=1e-4, rtol=1e-4)


def test_int8_embedding_rows_are_the_dequantized_table():
    emb = quant.Int8Embedding(50, 32, torch.bfloat16)
    emb.weight.data, emb.weight_scale.data = quant.quantize_weight(torch.randn(50, 32))
    ids = torch.tensor([3, 0, 49, 3])
    ref = quant.dequantize_weight(emb.weight.data, emb.weight_scale.data, torch.bfloat16)[ids]
    assert torch.equal(emb(ids), ref)


# -- 8-bit KV --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_kv_rows_round_trip_within_the_format_precision(fmt):
    x = torch.randn(9, 3, 64) * torch.logspace(-4, 2, 9)[:, None, None]  # tokens of very different ranges
    x[0, 0, :32] = 0  # an all-zero group
    packed = kv_quant.quantize(x, fmt)
    assert packed.dtype == kv_quant.FORMATS[fmt] and packed.shape == (9, 3, 66)
    back = kv_quant.dequantize(packed, 64, torch.float32)
    assert torch.equal(back[0, 0, :32], torch.zeros(32))
    groups, err = x.view(9, 3, 2, 32), (back - x).view(9, 3, 2, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    # int8: half a step of a scale below 2 amax / 127; fp8 e4m3: 3 mantissa bits, relative to each value
    # (with the group's smallest values on the subnormal grid: 2**-9 times the scale <= amax / 448 * 2)
    bound = amax / 127 if fmt == "int8" else groups.abs() / 16 + amax / 448 * 2 ** -8
    assert bool((err.abs() <= bound + 1e-12).all())


def test_8bit_kv_takes_half_the_bytes_of_bfloat16_plus_the_scales():
    assert kv_quant.packed_width(64) == 66 and kv_quant.packed_width(128) == 132
    assert 2 * 64 / kv_quant.packed_width(64) >= 1.9
    with pytest.raises(ValueError, match="divisible by 32"):
        kv_quant.packed_width(48)


@needs_kernels
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_write_is_byte_identical_to_the_reference_quantization(monkeypatch, fmt, dtype):
    g = torch.Generator().manual_seed(5)
    k = (torch.randn(23, 2, 64, generator=g) * 5).to(dtype)
    v = (torch.randn(23, 2, 64, generator=g) / 7).to(dtype)
    slots = torch.randperm(10 * 4, generator=g)[:23]
    caches = [torch.zeros(10, 4, 2, 66, dtype=kv_quant.FORMATS[fmt]) for _ in range(4)]
    write_kv(caches[0], caches[1], k, v, slots)  # C++
    monkeypatch.setattr(cpu_kernels, "supports", lambda device, dtype: False)
    write_kv(caches[2], caches[3], k, v, slots)  # PyTorch
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def _packed_case(fmt, d, heads, kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    nb, bs = 30, 4
    k = kv_quant.quantize(torch.randn(nb, bs, kv_heads, d, generator=g) * 3, fmt)
    v = kv_quant.quantize(torch.randn(nb, bs, kv_heads, d, generator=g), fmt)
    lens = torch.tensor([1, 5, 8, 9, 17, 30])
    tables = torch.stack([torch.randperm(nb, generator=g)[:8] for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=g)
    return k, v, lens, tables, q


@needs_kernels
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("d", [32, 64, 96])  # 96: the kernel's scalar path
@pytest.mark.parametrize("window", [None, 6])
def test_decode_kernel_over_8bit_cache_equals_float_attention_over_the_dequantized_cache(monkeypatch, fmt, d,
                                                                                         window):
    k, v, lens, tables, q = _packed_case(fmt, d, 6, 2, seed=d)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=[],
                             decodes=[DecodeGroup(0, tables, lens, int(lens.max()))], sliding_window=window)
    fast = paged_attention(q, k, v, meta, d ** -0.5)  # reads the packed rows in place
    k_ref, v_ref = kv_quant.dequantize(k, d, torch.float32), kv_quant.dequantize(v, d, torch.float32)
    monkeypatch.setattr(cpu_kernels, "usable", lambda q: False)
    reference = paged_attention(q, k_ref, v_ref, meta, d ** -0.5)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    gathered = paged_attention(q, k, v, meta, d ** -0.5)  # the fallback: gather, dequantize, SDPA
    torch.testing.assert_close(gathered, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_prefill_over_8bit_cache_equals_float_attention_over_the_dequantized_cache(fmt):
    k, v, _, tables, _ = _packed_case(fmt, 32, 4, 2, seed=3)
    q = torch.randn(7, 4, 32)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long),
                             prefills=[PrefillSeq(0, 7, 19, tables[0])], decodes=[])
    out = paged_attention(q, k, v, meta, 32 ** -0.5)
    ref = paged_attention(q, kv_quant.dequantize(k, 32, torch.float32), kv_quant.dequantize(v, 32, torch.float32),
                          meta, 32 ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_triton_int8_kernel_equals_the_dequantized_reference_in_the_interpreter():
    """The CUDA kernel's program, run by Triton's CPU interpreter (float16/float32: the interpreter
    has no bfloat16 arithmetic). tests/gpu runs it natively."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    code = """
import torch, torch.nn.functional as F
from shared.engine.model import quant, triton_int8
for rows, k, n, dtype in [(1, 64, 96, torch.float32), (5, 200, 130, torch.float32), (17, 128, 64, torch.float16)]:
    q, s = quant.quantize_weight(torch.randn(n, k))
    x = torch.randn(rows, k).to(dtype)
    out = triton_int8.int8_matmul(x, q, s)
    ref = F.linear(x.float(), quant.dequantize_weight(q, s, torch.float32))
    assert out.dtype == dtype and out.shape == (rows, n)
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
