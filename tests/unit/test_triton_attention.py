"""The Triton paged-attention kernels equal reference attention (SDPA over gathered K/V), run on
CPU tensors by Triton's interpreter (sizes are tiny: it runs every program in numpy). Where
Triton was imported for a GPU instead (a CUDA machine), the same tests run compiled on CUDA
tensors."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads the flag on import and when the kernels are defined: set it before either
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import shared.engine.model.triton_attention as ta  # noqa: E402
from tests.helpers import attention_ref  # noqa: E402
from tests.helpers.attention_ref import reference  # noqa: E402

DEVICE = "cpu" if ta.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("Triton was imported without TRITON_INTERPRET and there is no GPU", allow_module_level=True)


def dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


BS = 8  # KV block size in these tests


def make_cache(num_blocks, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, BS, hkv, d, generator=g).to(dtype)
    v = torch.randn(num_blocks, BS, hkv, d, generator=g).to(dtype)
    return k, v


def block_tables(ctx_lens, num_blocks, seed=0):
    return attention_ref.block_tables(ctx_lens, num_blocks, BS, seed)


def run_decode(ctx_lens, hq, hkv, d, window=None, num_splits=1, dtype=torch.float32, seed=0, **kw):
    k_cache, v_cache = make_cache(64, hkv, d, dtype, seed)
    tables = block_tables(ctx_lens, 64, seed)
    q = torch.randn(len(ctx_lens), hq, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    kw = dict(zip(kw, dev(*kw.values()), strict=True))
    out = ta.decode_attention(*dev(q, k_cache, v_cache, tables, lens), d ** -0.5, window, num_splits=num_splits,
                              **kw).cpu()
    kw = {k: v.cpu() for k, v in kw.items()}
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, [1] * len(ctx_lens), d ** -0.5, window,
                    kw.get("k_scale"), kw.get("v_scale"))
    return out, ref


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_decode_matches_reference(d, ratio):
    hq, hkv = (2, 2) if ratio == 1 else (ratio, 1)
    out, ref = run_decode([1, 7, 19, 40], hq=hq, hkv=hkv, d=d)
    torch.testing.assert_close(out.float(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [2, 4, 8])
def test_decode_split_k_matches_reference(num_splits):
    # splits larger than a short context's tile count leave some splits empty (weight 0 in the merge)
    out, ref = run_decode([3, 33, 70], hq=4, hkv=1, d=64, num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_sliding_window(num_splits):
    out, ref = run_decode([5, 21, 50], hq=4, hkv=2, d=64, window=12, num_splits=num_splits)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_decode_bfloat16_cache():
    out, ref = run_decode([9, 30], hq=8, hkv=1, d=64, dtype=torch.bfloat16, num_splits=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_decode_int8_cache_with_scales():
    """The dequantize-on-load hook: an int8 cache with one scale per (block, KV head)."""
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randint(-127, 128, (64, BS, 2, 64), generator=g, dtype=torch.int8)
    v_cache = torch.randint(-127, 128, (64, BS, 2, 64), generator=g, dtype=torch.int8)
    k_scale = torch.rand(64, 2, generator=g) / 100
    v_scale = torch.rand(64, 2, generator=g) / 100
    ctx = [6, 25]
    tables = block_tables(ctx, 64)
    q = torch.randn(2, 4, 64, generator=g)
    scales = dict(zip(("k_scale", "v_scale"), dev(k_scale, v_scale), strict=True))
    out = ta.decode_attention(*dev(q, k_cache, v_cache, tables, torch.tensor(ctx)), 0.125, num_splits=2,
                              **scales).cpu()
    ref = reference(q, k_cache, v_cache, tables, ctx, [1, 1], 0.125, None, k_scale, v_scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    qv = torch.randn(5, 4, 64, generator=g)  # the varlen kernel reads through the same hook
    out = ta.varlen_attention(*dev(qv, k_cache, v_cache, torch.tensor([0, 2, 5]), torch.tensor(ctx), tables), 3,
                              0.125, **scales, block_m=16, block_n=16).cpu()
    ref = reference(qv, k_cache, v_cache, tables, ctx, [2, 3], 0.125, None, k_scale, v_scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_packed_8bit_cache_is_read_in_place(fmt):
    """The engine's 8-bit KV rows (elements, then one E8M0 scale byte per 32) through both kernels
    equal attention over the dequantized cache."""
    from shared.engine.model import kv_quant

    k_f, v_f = make_cache(64, 2, 64, seed=5)
    k_cache, v_cache = kv_quant.quantize(k_f * 3, fmt), kv_quant.quantize(v_f, fmt)  # [.., 2, 66]
    k_ref, v_ref = kv_quant.dequantize(k_cache, 64, torch.float32), kv_quant.dequantize(v_cache, 64, torch.float32)
    ctx = [6, 25, 40]
    tables = block_tables(ctx, 64)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 64, generator=g)
    out = ta.decode_attention(*dev(q, k_cache, v_cache, tables, torch.tensor(ctx)), 0.125, num_splits=2).cpu()
    ref = reference(q, k_ref, v_ref, tables, ctx, [1, 1, 1], 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    qv = torch.randn(6, 4, 64, generator=g)
    cu = torch.tensor([0, 2, 5, 6])
    out = ta.varlen_attention(*dev(qv, k_cache, v_cache, cu, torch.tensor(ctx), tables), 3, 0.125,
                              block_m=16, block_n=16).cpu()
    ref = reference(qv, k_ref, v_ref, tables, ctx, [2, 3, 1], 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def run_varlen(ctx_lens, q_lens, hq, hkv, d, window=None, dtype=torch.float32, seed=0):
    k_cache, v_cache = make_cache(64, hkv, d, dtype, seed)
    tables = block_tables(ctx_lens, 64, seed)
    q = torch.randn(sum(q_lens), hq, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = ta.varlen_attention(*dev(q, k_cache, v_cache, cu, torch.tensor(ctx_lens, dtype=torch.int32), tables),
                              max(q_lens), d ** -0.5, window, block_m=16, block_n=16).cpu()
    ref = reference(q, k_cache, v_cache, tables, ctx_lens, q_lens, d ** -0.5, window)
    return out, ref


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_varlen_mixed_batch_matches_reference(d, ratio):
    # a whole prompt, a chunk after a cached prefix, a decode, a speculative verification (k=3)
    ctx, qs = [21, 37, 13, 30], [21, 17, 1, 4]
    hq, hkv = (2, 2) if ratio == 1 else (ratio, 1)
    out, ref = run_varlen(ctx, qs, hq, hkv, d, seed=ratio)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_varlen_sliding_window():
    out, ref = run_varlen([40, 27, 9], [40, 6, 1], hq=4, hkv=2, d=64, window=11)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_varlen_bfloat16():
    out, ref = run_varlen([20, 35], [20, 3], hq=4, hkv=1, d=64, dtype=torch.bfloat16)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_verification_rows_equal_decodes():
    """k + 1 query tokens of one sequence through the varlen kernel = k + 1 decodes of growing context."""
    k_cache, v_cache = make_cache(64, 1, 64)
    tables = block_tables([29], 64)
    q = torch.randn(5, 4, 64)
    out = ta.varlen_attention(*dev(q, k_cache, v_cache, torch.tensor([0, 5]), torch.tensor([29]), tables), 5,
                              0.125, block_m=16, block_n=16)
    dec = ta.decode_attention(*dev(q, k_cache, v_cache, tables.expand(5, -1).contiguous(), torch.arange(25, 30)),
                              0.125, num_splits=2)
    torch.testing.assert_close(out, dec, atol=2e-5, rtol=1e-4)


def test_bad_arguments_are_refused():
    k_cache, v_cache = dev(*make_cache(4, 2, 64))
    with pytest.raises(ValueError, match="num_splits"):
        ta.decode_attention(torch.randn(1, 4, 64), k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                            torch.tensor([1]), 0.1, num_splits=3)
    with pytest.raises(ValueError, match="does not fit"):
        ta.decode_attention(torch.randn(1, 3, 64), k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                            torch.tensor([1]), 0.1)
    with pytest.raises(ValueError, match="come together"):
        ta.decode_attention(torch.randn(1, 4, 64), k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                            torch.tensor([1]), 0.1, k_scale=torch.ones(4, 2))


def test_default_num_splits():
    assert ta.default_num_splits(1, 8, 4096, num_sms=132) == 32  # batch 1: many splits fill the GPU
    assert ta.default_num_splits(64, 8, 4096, num_sms=132) == 1  # a big batch fills it alone
    assert ta.default_num_splits(1, 8, 20, num_sms=132) == 2  # no more splits than key tiles


@pytest.fixture(scope="module")
def sliding_checkpoint(tmp_path_factory):
    from tests.helpers.models import hf_greedy, load_hf, make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("triton-engine"), arch="mistral", sliding_window=16,
                                hidden=128, heads=4, kv_heads=1)  # head_dim 32, GQA ratio 4
    hf = load_hf(path)
    prompts = [[1, *range(5, 45)], [1, 30, 31], [1, 7], [1, *range(50, 58)] * 3]  # the last one repeats: n-grams
    return path, prompts, [hf_greedy(hf, p, 8) for p in prompts]


@pytest.mark.parametrize("graphs, ngram", [(True, False), (True, True)])  # mixed steps run eagerly
@pytest.mark.skipif(DEVICE != "cpu", reason="tests/gpu and tools/gpu_check.py cover the engine on CUDA")
def test_engine_through_the_triton_path_matches_hf(sliding_checkpoint, graphs, ngram):
    """The runner's CUDA path (one varlen + one decode launch per layer, int32 index tensors,
    split-K, optionally the decode graphs) on CPU tensors: HF's greedy tokens, chunked prefill
    and staggered joins included; with n-gram speculation, verification runs through the varlen
    kernel (several query tokens of one sequence at their own causal offsets)."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams
    from shared.engine.spec import NgramProposer
    from tests.unit.test_cuda_graphs import ReplayAgain

    path, prompts, refs = sliding_checkpoint
    engine = LLMEngine(EngineConfig(model=str(path), num_blocks=64, block_size=8, max_num_batched_tokens=24,
                                    max_num_seqs=4, adaptive_speculation=False))
    runner = engine.runner
    runner._triton, runner._num_sms = True, 4  # as on a (small) GPU: several decode splits
    if graphs:
        runner.enable_decode_graphs(4, engine.max_model_len, backend=ReplayAgain())
    if ngram:
        engine.set_proposer(NgramProposer())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = {i: [] for i in range(len(prompts))}
    pending, steps, verified = list(enumerate(prompts)), 0, 0
    while pending or engine.has_unfinished():
        if pending and steps % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for out in engine.step():
            outputs[int(out.request_id)].extend(out.new_token_ids)
            verified += out.num_spec_steps if out.finished else 0
        steps += 1
    assert [outputs[i] for i in range(len(prompts))] == refs
    if graphs:
        assert sum(runner.graphs.replays.values()) > 0
    assert (verified > 0) == ngram


@pytest.mark.parametrize("kv", ["fp8", "int8"])
@pytest.mark.skipif(DEVICE != "cpu", reason="tests/gpu and tools/gpu_check.py cover the engine on CUDA")
def test_engine_with_8bit_kv_through_the_triton_path_matches_its_cpu_path(sliding_checkpoint, kv):
    """An 8-bit KV cache read in place by the Triton kernels (the runner's CUDA path, on CPU tensors)
    gives the greedy tokens of the CPU path (the C++ decode kernel and SDPA over dequantized gathers)."""
    from shared.engine import EngineConfig, LLMEngine, SamplingParams

    path, prompts, _ = sliding_checkpoint
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cfg = dict(model=str(path), num_blocks=64, block_size=8, max_num_batched_tokens=24, kv_cache_dtype=kv)
    cpu = LLMEngine(EngineConfig(**cfg)).generate(prompts, params)
    engine = LLMEngine(EngineConfig(**cfg))
    engine.runner._triton, engine.runner._num_sms = True, 4
    engine.runner._decode_kernel = False
    assert engine.generate(prompts, params) == cpu


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the other tests compile the kernels for it")
def test_kernels_compile_for_hopper():
    """Compiled (not interpreted) for sm_90 with the ptxas Triton ships: no GPU needed. Catches
    what the interpreter accepts but the compiler does not. Runs in a child process, without
    TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.helpers.triton_compile", "--cases", "quick"], env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 3 kernel variants for sm_90" in done.stdout


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the other tests compile the kernels for it")
def test_packed_8bit_reads_compile_for_hopper():
    """The packed 8-bit KV reads (fp8 and int8 rows, both kernels) compile for sm_90."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.helpers.triton_compile", "--cases", "packed"], env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 4 kernel variants for sm_90" in done.stdout
