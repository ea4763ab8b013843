from __future__ import annotations

import pytest

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.models import make_tiny_checkpoint

from .cluster import BLOCK_SIZE, NUM_BLOCKS


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama with the test tokenizer (built once per session)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def reference(tiny_model):
    """Single-process engine: what every served output must equal."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE))

    def generate(prompt: list[int], max_tokens: int, **params) -> list[int]:
        params.setdefault("temperature", 0.0)
        params.setdefault("ignore_eos", True)
        return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **params))[0]

    generate.engine = engine
    return generate
