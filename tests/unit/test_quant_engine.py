"""The engine with int8 weights and an 8-bit KV cache: greedy output of the demo model close to the
unquantized one, ~2x the KV blocks in one memory budget, prefix caching, KV export/import
byte for byte, a refused type mismatch, and int8 checkpoints that load as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.model import kv_quant, quant
from shared.kv import KvAssembler, KvShapeMismatch, split_kv
from tests.helpers.models import make_tiny_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "models" / "tandem-demo-code" / "target"
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _engine(model, **kw) -> LLMEngine:
    cfg = dict(model=str(model), num_blocks=96, block_size=8, max_num_batched_tokens=256)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # head_dim 32: the smallest an 8-bit cache takes
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-q"), hidden=128, heads=4, kv_heads=2, tie=True)


def _demo_prompts() -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    texts = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(", "class Stack:\n    def __init__(self):\n",
             "for i in range(10):\n", "    return json.dumps(", "def read_file(path):\n    with open("]
    return [tok.encode(t).ids for t in texts]


@pytest.mark.skipif(not DEMO.is_dir(), reason="demo model not in the tree")
@pytest.mark.parametrize("quantization,kv", [("int8", "auto"), ("none", "fp8"), ("none", "int8"), ("int8", "fp8")])
def test_demo_model_greedy_output_stays_close_to_unquantized(quantization, kv):
    prompts = _demo_prompts()
    base = _engine(DEMO, dtype="bfloat16").generate(prompts, GREEDY)
    got = _engine(DEMO, dtype="bfloat16", quantization=quantization, kv_cache_dtype=kv).generate(prompts, GREEDY)
    same = sum(a == b for out, ref in zip(got, base, strict=True) for a, b in zip(out, ref, strict=True))
    share = same / sum(len(r) for r in base)
    print(f"{quantization} weights, {kv} KV: {share:.1%} of greedy tokens identical to bfloat16")
    # positions after a first divergence count as different, so this is a lower bound on agreement
    assert share >= 0.5
    assert all(out[:2] == ref[:2] for out, ref in zip(got, base, strict=True))


def test_int8_weights_take_about_half_the_bytes(tiny):
    dense = _engine(tiny, dtype="bfloat16").runner.weight_bytes()
    q = _engine(tiny, dtype="bfloat16", quantization="int8").runner.weight_bytes()
    assert q <= 0.55 * dense


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_same_memory_holds_about_twice_the_kv_blocks(tiny, kv):
    budget = 1 << 20
    base = _engine(tiny, dtype="bfloat16", num_blocks=None, kv_cache_memory=budget).kv.pool.num_blocks
    small = _engine(tiny, dtype="bfloat16", num_blocks=None, kv_cache_memory=budget, kv_cache_dtype=kv)
    assert small.kv.pool.num_blocks >= 1.9 * base
    assert small.runner.kv_cache.dtype == kv_quant.FORMATS[kv]
    pad_block = small.runner.kv_bytes_per_block(8)  # one block beyond the pool's, written by padding rows
    assert small.runner.kv_cache.numel() * small.runner.kv_cache.element_size() <= budget + pad_block


def test_8bit_kv_needs_head_dim_divisible_by_32(tmp_path):
    model = make_tiny_checkpoint(tmp_path, hidden=64, heads=4, kv_heads=2)  # head_dim 16
    with pytest.raises(ValueError, match="divisible by 32"):
        _engine(model, kv_cache_dtype="fp8")


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_prefix_cache_hits_with_8bit_kv_give_the_uncached_output(tiny, kv):
    prefix = [1, *range(10, 50)]  # 41 tokens: five full blocks of 8
    prompt = prefix + [60, 61, 62]
    cold = _engine(tiny, kv_cache_dtype=kv, enable_prefix_caching=False).generate([prompt], GREEDY)[0]
    engine = _engine(tiny, kv_cache_dtype=kv)
    engine.generate([prefix + [70]], GREEDY)
    hits = engine.kv.hit_tokens
    assert engine.generate([prompt], GREEDY)[0] == cold
    assert engine.kv.hit_tokens - hits == 40


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_exported_8bit_kv_imports_byte_for_byte_and_decodes_as_locally(tiny, kv):
    prompt = [1, *range(20, 57)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prefill, decode = _engine(tiny, kv_cache_dtype=kv), _engine(tiny, kv_cache_dtype=kv)
    prefill.add_request("r", prompt, params, hold_kv=True)
    first: list[int] = []
    while prefill.has_unfinished():
        first += [t for out in prefill.step() for t in out.new_token_ids]
    exported = prefill.export_kv("r")
    assert exported.dtype == kv_quant.FORMATS[kv] and exported.shape[-1] == kv_quant.packed_width(32)
    assert decode.reserve("r", len(prompt) + 1)
    asm = KvAssembler(exported.shape, decode.kv_cache_dtype)
    for chunk in split_kv(exported, max_chunk_bytes=4096):
        piece = asm.add(chunk)
        decode.import_kv("r", piece.tensor, piece.layer_start, piece.token_start)
    assert asm.complete
    imported = decode.runner.gather_kv(decode.kv.block_ids("r"), len(prompt))
    assert torch.equal(imported.view(torch.uint8), exported.view(torch.uint8))
    decode.add_prefilled("r", prompt, first[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    rest = []
    while decode.has_unfinished():
        rest += [t for out in decode.step() for t in out.new_token_ids]
    local = _engine(tiny, kv_cache_dtype=kv).generate([prompt], SamplingParams(temperature=0.0, max_tokens=20,
                                                                              ignore_eos=True))[0]
    assert first[:1] + rest == local


def test_a_kv_type_mismatch_is_refused(tiny):
    plain, fp8 = _engine(tiny, dtype="bfloat16"), _engine(tiny, kv_cache_dtype="fp8")
    payload = torch.zeros(2, 2, 8, 2, 32, dtype=torch.bfloat16)
    chunk = next(split_kv(payload))
    with pytest.raises(KvShapeMismatch, match="dtype bfloat16, expected fp8"):
        KvAssembler((2, 2, 8, 2, kv_quant.packed_width(32)), fp8.kv_cache_dtype).add(chunk)
    assert fp8.reserve("r", 8)
    with pytest.raises(ValueError, match="fp8 cache"):
        fp8.import_kv("r", payload)
    assert plain.reserve("r", 8)
    with pytest.raises(ValueError, match="bfloat16 cache"):
        plain.import_kv("r", torch.zeros(2, 2, 8, 2, 33, dtype=torch.uint8))


def test_an_int8_checkpoint_loads_as_it_is(tiny, tmp_path):
    """compressed-tensors' symmetric per-channel int8 layout: `weight` int8, `weight_scale` [N, 1]."""
    state = load_file(str(tiny / "model.safetensors"))
    out = {}
    for name, t in state.items():
        if name.endswith("proj.weight"):
            q, s = quant.quantize_weight(t)
            out[name], out[name + "_scale"] = q, s[:, None]  # float32 scales: the same numbers as quantized here
        else:
            out[name] = t
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(out, str(tmp_path / "model.safetensors"))
    loaded = _engine(tmp_path, quantization="int8").runner.model
    lin = loaded.model.layers[0].mlp.up_proj
    assert torch.equal(lin.weight, out["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(lin.weight_scale, out["model.layers.0.mlp.up_proj.weight_scale"].float().view(-1))
    prompts = [[1, *range(5, 30)]]
    quantized_here = _engine(tiny, quantization="int8").generate(prompts, GREEDY)
    assert _engine(tmp_path, quantization="int8").generate(prompts, GREEDY) == quantized_here
    assert len(_engine(tmp_path).generate(prompts, GREEDY)[0]) == GREEDY.max_tokens  # dequantized into float32
