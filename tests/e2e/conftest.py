from __future__ import annotations

import pytest

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from tests.helpers.models import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-e2e"))


@pytest.fixture(scope="session")
def reference(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), num_blocks=64))

    def generate(prompt: list[int], max_tokens: int) -> list[int]:
        return engine.generate(
            [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        )[0]

    return generate
