"""The engine on CUDA matches HF transformers (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.models import hf_greedy, load_hf, make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_greedy_matches_hf(tmp_path):
    path = make_tiny_checkpoint(tmp_path)
    hf = load_hf(path)
    prompts = [[1, *range(5, 45)], [1, 30, 31], [1, *range(100, 160)]]
    refs = [hf_greedy(hf, p, 16) for p in prompts]
    # float32 like the reference (bfloat16 is the CUDA default); chunked prefill, then decode
    # steps replayed as CUDA graphs through the Triton kernels
    engine = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="float32", num_blocks=64, block_size=8,
                                    max_num_batched_tokens=16, max_num_seqs=4))
    assert engine.runner.kv_cache.is_cuda and engine.runner.graphs is not None
    assert engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) == refs
    assert sum(engine.runner.graphs.replays.values()) > 0
    s = engine.stats()
    assert s.num_free_blocks == s.num_total_blocks


def test_cuda_defaults_to_bfloat16(tmp_path):
    path = make_tiny_checkpoint(tmp_path)
    engine = LLMEngine(EngineConfig(model=str(path), device="cuda", num_blocks=16, block_size=8, cuda_graphs=False))
    assert engine.runner.kv_cache.dtype == torch.bfloat16 and engine.config.dtype == "bfloat16"
    assert engine.runner.graphs is None
