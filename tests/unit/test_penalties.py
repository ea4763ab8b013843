"""OpenAI's frequency and presence penalties and logit bias, against a reference built on HF
transformers' logits: the engine's greedy outputs equal it token for token, in a staggered
batch, with chunked prefill, and with speculation (drafts verified against the penalised
logits); the penalties count generated tokens only, a resumed request's earlier outputs included."""

from __future__ import annotations

import pytest
import torch

from services.common.draft_calls import InProcessDraft
from services.decode.draft_client import DraftProposer, build_draft_engine
from shared.config import WorkerConfig, from_env
from shared.engine import EngineConfig, InvalidRequest, LLMEngine, SamplingParams
from shared.engine.sampler import SamplingRow, sample, target_distribution
from shared.engine.spec import NgramProposer
from shared.telemetry import TelemetryConfig, setup_telemetry
from tests.helpers.models import hf_greedy_penalised, load_hf, make_tiny_checkpoint

PROMPTS = [[1, *range(5, 45)], [1, 30, 31, 30, 31], [1, *range(100, 119)], [1, 7]]
MAX_TOKENS = 24


def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    return hf_greedy_penalised(
        model, prompt, params.max_tokens, params.frequency_penalty, params.presence_penalty, params.logit_bias
    )


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("penalties"))
    return path, load_hf(path)


CASES = {
    "frequency": dict(frequency_penalty=1.5),
    "presence": dict(presence_penalty=2.0),
    "negative": dict(frequency_penalty=-0.5, presence_penalty=-0.5),
    "bias": dict(logit_bias={11: 3.0, 12: -100.0, 300: 1.5}),
    "all": dict(frequency_penalty=0.7, presence_penalty=0.4, logit_bias={50: 2.0}),
}


def run(engine: LLMEngine, params: SamplingParams) -> list[list[int]]:
    """Requests join a batch already decoding, one every two steps."""
    outputs = {i: [] for i in range(len(PROMPTS))}
    pending, steps = list(enumerate(PROMPTS)), 0
    while pending or engine.has_unfinished():
        if pending and steps % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for o in engine.step():
            outputs[int(o.request_id)] += o.new_token_ids
        steps += 1
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not engine.requests
    return [outputs[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_with_penalties_matches_reference(hf_ckpt, case):
    path, model = hf_ckpt
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **CASES[case])
    refs = [reference(model, p, params) for p in PROMPTS]
    plain = [reference(model, p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)) for p in PROMPTS]
    assert refs != plain  # the case changes what greedy decoding picks
    cfg = dict(model=str(path), num_blocks=128, block_size=8)
    assert run(LLMEngine(EngineConfig(**cfg, max_num_batched_tokens=16)), params) == refs  # chunked prefill
    speculating = LLMEngine(EngineConfig(**cfg, num_speculative_tokens=3, adaptive_speculation=False))
    speculating.set_proposer(NgramProposer())
    assert run(speculating, params) == refs
    # a draft model (the target itself, through the draft service's calls): it applies the logit
    # bias but not the penalties, which only lowers how many of its proposals are accepted
    drafting = LLMEngine(EngineConfig(**cfg, num_speculative_tokens=3, adaptive_speculation=False))
    draft = build_draft_engine(from_env(WorkerConfig, env={}, overrides={
        "model": str(path), "draft_model": str(path), "draft_kv_cache_memory": 1 << 20}))
    telemetry = setup_telemetry(TelemetryConfig(service_name="t"), set_global=False, configure_logs=False)
    drafting.set_proposer(DraftProposer("", local=InProcessDraft(draft), vocab_size=draft.vocab_size,
                                        timeout_s=5.0, retry_s=1.0, telemetry=telemetry))
    assert run(drafting, params) == refs


def test_penalties_count_generated_tokens_not_the_prompt():
    logits = torch.zeros(1, 8)
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5)
    # prompt [3, 3, 4], then outputs [4, 5, 5]
    got = target_distribution(logits, [SamplingRow(params, [3, 3, 4, 4, 5, 5], 3)])[0]
    assert got.tolist() == [0, 0, 0, 0, -1.5, -2.5, 0, 0]
    # a resumed request: its earlier output (a 4) sits at the end of its prompt and counts
    # (output_index = outputs here + seed_offset)
    resumed = target_distribution(logits, [SamplingRow(params, [3, 3, 4, 4, 5, 5], 4)])[0]
    assert resumed.tolist() == [0, 0, 0, 0, -2.5, -2.5, 0, 0]
    assert target_distribution(logits, [SamplingRow(params, [3, 3, 4], 0)])[0].tolist() == [0] * 8


def test_logit_bias_steers_sampling_and_greedy():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    banned = SamplingParams(temperature=1.0, seed=3, logit_bias={0: -100.0, 1: -100.0})
    draws = {sample(logits, [SamplingRow(banned, [], i)])[0][0] for i in range(50)}
    assert draws <= {2, 3} and len(draws) == 2
    forced = SamplingParams(temperature=0.0, logit_bias={3: 100.0})
    assert sample(logits, [SamplingRow(forced, [], 0)])[0] == [3]
    # logprobs stay the raw model's
    _, (lp,) = sample(logits, [SamplingRow(SamplingParams(temperature=0.0, logprobs=1, logit_bias={3: 100.0}), [], 0)])
    assert lp.token_id == 3 and lp.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[3].item())
    # a draft with a smaller vocabulary skips the ids it does not have
    assert sample(logits, [SamplingRow(SamplingParams(temperature=0.0, logit_bias={9: 50.0}), [], 0)])[0] == [0]


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(presence_penalty=-3.0), "presence_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(logit_bias={5: float("inf")}), "logit_bias"),
        (dict(logit_bias={4096: 1.0}), "logit_bias"),
    ],
)
def test_out_of_range_values_are_refused(change, field):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**change).validate(vocab_size=4096)
    assert e.value.field == field


def test_a_resumed_request_counts_its_earlier_outputs(hf_ckpt):
    """Moved to another worker mid-generation (earlier outputs appended to the prompt,
    seed_offset = their count), a penalised request continues as if it had never moved."""
    path, _ = hf_ckpt
    engine = LLMEngine(EngineConfig(model=str(path), num_blocks=128, block_size=8))
    params = dict(temperature=0.0, ignore_eos=True, frequency_penalty=1.0, presence_penalty=0.5)
    prompt = PROMPTS[1]
    full = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, **params))[0]
    moved_after = 8
    resumed = engine.generate(
        [prompt + full[:moved_after]],
        SamplingParams(max_tokens=MAX_TOKENS - moved_after, seed_offset=moved_after, **params),
    )[0]
    assert resumed == full[moved_after:]
    # without the offset, the earlier outputs would count as prompt, unpenalised
    naive = engine.generate([prompt + full[:moved_after]], SamplingParams(max_tokens=MAX_TOKENS - moved_after, **params))[0]
    assert naive != full[moved_after:]
