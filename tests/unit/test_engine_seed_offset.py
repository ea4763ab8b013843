"""A seeded request resumed elsewhere (earlier outputs appended to its prompt, seed_offset =
their count) continues with exactly the tokens it would have produced had it never moved.
This is what lets the scheduler move a stream to another decode worker mid-generation."""

from __future__ import annotations

import pytest

from shared.engine import EngineConfig, InvalidRequest, LLMEngine, SamplingParams
from shared.engine.spec import NgramProposer
from tests.helpers.models import make_tiny_checkpoint

PROMPT = [1, *range(5, 40)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("seed-offset"))


def make_engine(ckpt) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(ckpt), num_blocks=64, block_size=8))


@pytest.mark.parametrize("penalised", [False, True])
@pytest.mark.parametrize("speculate", [False, True])
def test_resumed_seeded_request_continues_the_same_stream(ckpt, speculate, penalised):
    params = dict(temperature=1.0, top_k=40, seed=77, ignore_eos=True)
    if penalised:  # counted over generated tokens: the resumed one's earlier outputs included
        params.update(frequency_penalty=1.5, presence_penalty=1.0)
    engine = make_engine(ckpt)
    if speculate:
        engine.set_proposer(NgramProposer())
    full = engine.generate([PROMPT], SamplingParams(max_tokens=20, **params))[0]
    for moved_after in (1, 7, 19):
        resumed = engine.generate(
            [PROMPT + full[:moved_after]],
            SamplingParams(max_tokens=20 - moved_after, seed_offset=moved_after, **params),
        )[0]
        assert resumed == full[moved_after:]
    # without the offset the resumed request would redraw from the start of its seed's stream
    naive = engine.generate([PROMPT + full[:7]], SamplingParams(max_tokens=13, **params))[0]
    assert naive != full[7:]


def test_negative_seed_offset_is_invalid():
    with pytest.raises(InvalidRequest, match="seed_offset"):
        SamplingParams(seed_offset=-1).validate()
