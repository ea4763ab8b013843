"""The engine's greedy outputs equal HF transformers token for token, under every scheduling regime."""

from __future__ import annotations

import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.model import ModelLoadError
from tests.helpers.models import hf_greedy, load_hf, make_tiny_checkpoint, to_pytorch_bin

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

PROMPTS = [
    [1, *range(5, 45)],  # 41 tokens: several blocks
    [1, 30, 31],
    [1, *range(100, 119)],  # exactly 20
    [1, *range(200, 260)],  # 61 tokens
    [1, 7],
]

CHECKPOINTS = {
    "llama-gqa-untied": dict(arch="llama"),
    "llama-tied-mha": dict(arch="llama", tie=True, kv_heads=4),
    "llama3-rope-scaling": dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 64}),
    "qwen2-qkv-bias": dict(arch="qwen2", tie=True),
    "qwen3-qk-norm": dict(arch="qwen3", tie=True, head_dim=32),  # head_dim != hidden / heads, as in Qwen3
    # Phi-3: fused projections; a window on every layer (Phi-3-mini's 2047); LongRoPE (Phi-3.5's)
    "phi3-fused-sliding-window": dict(arch="phi3", sliding_window=16),
    "phi3-longrope": dict(arch="phi3", tie=True, max_positions=512, original_max_position_embeddings=128, rope_scaling={
        "rope_type": "longrope", "original_max_position_embeddings": 128,
        "short_factor": [1.0 + 0.15 * i for i in range(8)], "long_factor": [4.0 + i for i in range(8)]}),
    # Gemma 3: a window on the first layer only, its own RoPE base there; norms stored as 1 + weight
    "gemma3-text": dict(arch="gemma3", tie=True, head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "mistral": dict(arch="mistral", sliding_window=None),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=16),
    "llama-sharded": dict(arch="llama", sharded=True),
    # older checkpoints: PyTorch's pytorch_model.bin, one file or shards + index
    "llama-pytorch-bin": dict(arch="llama", weights="bin"),
    "qwen2-pytorch-bin-sharded": dict(arch="qwen2", tie=True, sharded=True, weights="bin"),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **CHECKPOINTS[request.param])
    model = load_hf(path)
    refs = [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]
    return path, model, refs


def _engine(path, **kw) -> LLMEngine:
    cfg = dict(model=str(path), num_blocks=128, block_size=8, max_num_batched_tokens=256)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def _run_staggered(engine: LLMEngine, prompts, params, join_every: int = 3) -> list[list[int]]:
    """Submit one prompt every few steps, so requests join a batch already decoding."""
    outputs = {i: [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % join_every == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for out in engine.step():
            outputs[int(out.request_id)].extend(out.new_token_ids)
        steps += 1
    return [outputs[i] for i in range(len(prompts))]


def _assert_no_leak(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks still referenced after all requests ended"
    assert not engine.requests


def test_first_step_logits_match_hf(checkpoint):
    path, model, _ = checkpoint
    engine = _engine(path)
    prompt = PROMPTS[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    engine.add_request("a", prompt, GREEDY)
    req = engine.requests["a"]
    batch = engine.scheduler.schedule()
    inputs = [engine._seq_input(r, n, {}) for r, n in batch.prefills]
    logits = engine.runner.forward(inputs, [], [1])[0]
    assert req.num_computed_tokens == 0
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_batch_staggered_matches_hf(checkpoint):
    path, _, refs = checkpoint
    engine = _engine(path)
    assert _run_staggered(engine, PROMPTS, GREEDY) == refs
    _assert_no_leak(engine)


def test_chunked_prefill_matches_hf(checkpoint):
    path, _, refs = checkpoint
    engine = _engine(path, max_num_batched_tokens=7)  # a 61-token prompt takes 9+ steps
    assert _run_staggered(engine, PROMPTS, GREEDY, join_every=1) == refs
    _assert_no_leak(engine)


def test_prefix_cache_hits_match_hf(checkpoint):
    path, model, _ = checkpoint
    engine = _engine(path)
    base = PROMPTS[0]
    variants = [base + [50, 51, 52], base + [60], base[:30] + [70, 71, 72, 73, 74]]
    refs = [hf_greedy(model, p, GREEDY.max_tokens) for p in variants]
    assert engine.generate([base], GREEDY)[0] == hf_greedy(model, base, GREEDY.max_tokens)
    cached = []
    for v, ref in zip(variants, refs, strict=True):
        engine.add_request("v", v, GREEDY)
        toks = []
        while engine.has_unfinished():
            for out in engine.step():
                toks.extend(out.new_token_ids)
                cached.append(out.num_cached_tokens)
        assert toks == ref
    # 41-token prefix with 8-token blocks: 5 full blocks reused by the first two variants, 3 by the last
    assert cached[0] == 40 and cached[GREEDY.max_tokens] == 40 and cached[-1] == 24
    _assert_no_leak(engine)


def _prompt_logprobs(engine: LLMEngine, prompts, top_n: int = 3) -> list[list]:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=top_n)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[int, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert int(out.request_id) not in got, "prompt logprobs sent twice"
                got[int(out.request_id)] = out.prompt_logprobs
    return [got[i] for i in range(len(prompts))]


def _assert_prompt_logprobs_match(model, prompts, got, top_n: int = 3) -> None:
    for prompt, lps in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert [lp.token_id for lp in lps] == prompt[1:]
        for i, lp in enumerate(lps):
            assert lp.logprob == pytest.approx(float(ref[i, prompt[i + 1]]), abs=1e-4)
            assert [t for t, _ in lp.top] == ref[i].topk(top_n).indices.tolist()


def test_prompt_logprobs_match_hf(checkpoint):
    """Every prompt token's logprob (what lm-eval's loglikelihood tasks read through echo), in
    chunks of a prefill split across steps, and after the same prompts filled the prefix cache:
    computed again, never read from it."""
    path, model, _ = checkpoint
    engine = _engine(path, max_num_batched_tokens=16)
    _run_staggered(engine, PROMPTS, GREEDY)  # the prompts' blocks are cached now
    before = engine.stats()
    got = _prompt_logprobs(engine, PROMPTS)
    _assert_prompt_logprobs_match(model, PROMPTS, got)
    after = engine.stats()  # not looked up, so neither a hit nor a miss of the prefix cache
    assert (after.prefix_cache_query_tokens, after.prefix_cache_hit_tokens) == (
        before.prefix_cache_query_tokens, before.prefix_cache_hit_tokens)
    _assert_no_leak(engine)


def test_prompt_logprobs_survive_preemption_mid_prefill(tiny_checkpoint_and_hf):
    """A request preempted between two chunks of its prompt computes them again: each position's
    logprob is kept once."""
    path, model = tiny_checkpoint_and_hf
    # 10 blocks of 8 tokens, prefill chunks of 16: the long prompts cannot all run together
    engine = _engine(path, num_blocks=10, max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts = [[1, *range(5, 45)], [1, *range(200, 239)]]
    got = _prompt_logprobs(engine, prompts, top_n=0)  # the prompt tokens' own logprobs, no alternatives
    assert engine.stats().num_preemptions > 0
    _assert_prompt_logprobs_match(model, prompts, got, top_n=0)
    _assert_no_leak(engine)


def test_prompt_logprobs_chunks_are_capped(tiny_checkpoint_and_hf, monkeypatch):
    """Each prefill chunk of a request collecting prompt logprobs keeps its rows' logits (a
    vocabulary each): the scheduler caps such a chunk at PROMPT_LOGPROBS_ROWS tokens, whatever
    the step's token budget."""
    from shared.engine import scheduler

    path, model = tiny_checkpoint_and_hf
    monkeypatch.setattr(scheduler, "PROMPT_LOGPROBS_ROWS", 8)
    engine = _engine(path, max_num_batched_tokens=256)
    chunks = []
    forward = engine.runner.forward

    def spy(prefills, decodes, num_logits):
        chunks.extend(s.n for s in prefills)
        return forward(prefills, decodes, num_logits)

    engine.runner.forward = spy
    prompt = PROMPTS[0]  # 41 tokens
    got = _prompt_logprobs(engine, [prompt])
    assert chunks == [8, 8, 8, 8, 8]  # the 41st token runs as a decode: its row samples the first output
    _assert_prompt_logprobs_match(model, [prompt], got)
    _assert_no_leak(engine)


@pytest.fixture(scope="module")
def tiny_checkpoint_and_hf(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("preempt"))
    return path, load_hf(path)


def test_preemption_matches_hf(checkpoint):
    path, _, refs = checkpoint
    # 24 blocks of 8 = 192 token slots for requests that need 27..85 each: some must be preempted
    engine = _engine(path, num_blocks=24, enable_prefix_caching=False)
    assert _run_staggered(engine, PROMPTS, GREEDY, join_every=1) == refs
    assert engine.stats().num_preemptions > 0
    _assert_no_leak(engine)


def test_unknown_architecture_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path)
    cfg = (path / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (path / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        _engine(path)


def test_missing_weights_file_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _engine(path)


def test_legacy_pytorch_bin_loads_like_safetensors(tmp_path):
    """A pre-zipfile pytorch_model.bin (torch.save of torch < 1.6) cannot be memory-mapped: read whole."""
    path = make_tiny_checkpoint(tmp_path / "st")
    legacy = make_tiny_checkpoint(tmp_path / "bin")
    to_pytorch_bin(legacy, legacy=True)
    outs = [_run_staggered(_engine(p), PROMPTS[:2], GREEDY) for p in (path, legacy)]
    assert outs[0] == outs[1] and len(outs[0][0]) == GREEDY.max_tokens


def test_safetensors_win_over_pytorch_bin(tmp_path):
    path = make_tiny_checkpoint(tmp_path)
    torch.save({"garbage": torch.zeros(1)}, path / "pytorch_model.bin")
    _engine(path)  # loads model.safetensors; the .bin is never read


def test_pytorch_bin_with_code_is_refused(tmp_path):
    """weights_only: a .bin whose pickle would run code (or holds anything but tensors) is refused
    with a line saying what to do, never unpickled."""
    path = make_tiny_checkpoint(tmp_path, weights="bin")
    torch.save({"model.embed_tokens.weight": torch.zeros(1), "x": _Payload()}, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*convert the checkpoint to safetensors"):
        _engine(path)
    torch.save([torch.zeros(1)], path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="not a state dict of tensors"):
        _engine(path)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_missing_config_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        _engine(tmp_path)


def test_gemma_norms_keep_one_plus_weight_in_float32_in_a_bfloat16_model(tmp_path):
    """transformers computes Gemma's (1 + weight) and the scaling in float32; rounding 1 + w to
    bfloat16 would move it by up to 2**-8 (a weight of 0.01 becomes 0.0078)."""
    from shared.engine.model.loader import load_state_dict

    path = make_tiny_checkpoint(tmp_path, arch="gemma3", tie=True, head_dim=32, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"])
    stored = load_state_dict(path)["model.layers.0.input_layernorm.weight"].to(torch.bfloat16)
    engine = _engine(path, dtype="bfloat16")
    model = engine.runner.model
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.dtype == torch.float32 and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(norm, load_state_dict(path)["model.layers.0.input_layernorm.weight"].float() + 1)
    assert not torch.equal(norm, (stored + 1).float())  # what adding in bfloat16 would give
