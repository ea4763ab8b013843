"""int8 weights and 8-bit KV on CUDA (skipped without a CUDA device): the Triton int8 matmul equals
the dequantized reference, and the quantized engine stays close to the unquantized one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.model import quant
from tests.helpers.models import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_triton_int8_linear_equals_the_dequantized_reference(dtype, rows):
    pytest.importorskip("triton")
    q, s = quant.quantize_weight(torch.randn(1000, 512) * 0.05)
    q, s = q.cuda(), s.cuda()
    x = torch.randn(rows, 512, device="cuda").to(dtype)
    out = quant.int8_linear(x, q, s)
    ref = F.linear(x.float(), quant.dequantize_weight(q, s, torch.float32))
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("quantization,kv", [("int8", "auto"), ("none", "fp8"), ("int8", "int8")])
def test_quantized_engine_on_cuda_runs_close_to_unquantized(tmp_path, quantization, kv):
    path = make_tiny_checkpoint(tmp_path, hidden=128, heads=4, kv_heads=2)
    prompts = [[1, *range(5, 45)], [1, *range(100, 160)]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    cfg = dict(model=str(path), device="cuda", num_blocks=64, block_size=8, dtype="bfloat16")
    base = LLMEngine(EngineConfig(**cfg)).generate(prompts, params)
    got = LLMEngine(EngineConfig(**cfg, quantization=quantization, kv_cache_dtype=kv)).generate(prompts, params)
    assert all(g[:2] == b[:2] for g, b in zip(got, base, strict=True))
