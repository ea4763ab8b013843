"""A checkpoint with a long context (Llama 3.2's 131072 positions) on a KV budget that cannot hold
one such sequence: max_model_len defaults to what the cache holds, with a log line; an explicit
max_model_len that does not fit is a one-line configuration error naming the settings."""

from __future__ import annotations

import json
import logging
import math

import pytest

from services.common.worker_app import build_engine
from shared.config import ConfigError, WorkerConfig, from_env
from shared.engine import EngineConfig, KVCacheTooSmall, LLMEngine, SamplingParams
from tests.helpers.models import make_tiny_checkpoint

LLAMA32_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
BUDGET = 1 << 22  # 4 MiB: 8192 tokens of the tiny model's KV (2 layers x 2 x 2 heads x 16 x 4 bytes)


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("llama32-shaped"), max_positions=131072, rope_scaling=LLAMA32_ROPE
    )
    assert json.loads((path / "config.json").read_text())["max_position_embeddings"] == 131072
    return path


def test_max_model_len_defaults_to_what_the_kv_cache_holds(long_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="shared.engine.engine"):
        engine = LLMEngine(EngineConfig(model=str(long_ckpt), kv_cache_memory=BUDGET))
    assert engine.max_model_len == engine.kv.pool.num_blocks * engine.block_size == 8192
    (line,) = [r.getMessage() for r in caplog.records if "max_model_len defaults to" in r.getMessage()]
    assert "8192" in line and "131072" in line and "TANDEM_MAX_MODEL_LEN" in line
    out = engine.generate([[1, 5, 6]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0]) == 4


def test_explicit_max_model_len_that_does_not_fit_names_the_settings(long_ckpt):
    with pytest.raises(KVCacheTooSmall, match="TANDEM_MAX_MODEL_LEN.*TANDEM_KV_CACHE_MEMORY"):
        LLMEngine(EngineConfig(model=str(long_ckpt), kv_cache_memory=BUDGET, max_model_len=131072))


def test_a_cache_under_a_mib_is_given_in_kib(long_ckpt):
    with pytest.raises(KVCacheTooSmall, match=r"\(\d+ KiB\)"):
        LLMEngine(EngineConfig(model=str(long_ckpt), kv_cache_memory=256 << 10, max_model_len=131072))


def test_worker_start_up_is_a_one_line_configuration_error(long_ckpt):
    config = from_env(
        WorkerConfig,
        env={
            "TANDEM_MODEL": str(long_ckpt),
            "TANDEM_KV_CACHE_MEMORY": str(BUDGET),
            "TANDEM_MAX_MODEL_LEN": "131072",
        },
    )
    with pytest.raises(ConfigError) as err:
        build_engine(config)
    message = str(err.value)
    assert "\n" not in message and "131072-token" in message
    assert "TANDEM_MAX_MODEL_LEN" in message and "TANDEM_KV_CACHE_MEMORY" in message


def test_an_explicit_max_model_len_that_fits_is_kept(long_ckpt):
    engine = LLMEngine(EngineConfig(model=str(long_ckpt), kv_cache_memory=BUDGET, max_model_len=2048))
    assert engine.max_model_len == 2048


def test_unsupported_architecture_is_a_one_line_error_naming_it(long_ckpt, tmp_path):
    for f in long_ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        build_engine(from_env(WorkerConfig, env={"TANDEM_MODEL": str(tmp_path)}))
    message = str(err.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in message


def test_an_8bit_kv_cache_for_a_head_size_it_cannot_pack_is_a_one_line_error(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path, hidden=64, heads=4)  # head_dim 16
    config = from_env(WorkerConfig, env={"TANDEM_MODEL": str(ckpt), "TANDEM_KV_CACHE_DTYPE": "int8"})
    with pytest.raises(ConfigError) as err:
        build_engine(config)
    message = str(err.value)
    assert "\n" not in message and "model's is 16" in message and "TANDEM_KV_CACHE_DTYPE=int8" in message


def test_qwen_sliding_window_follows_max_window_layers(tmp_path):
    from shared.engine.model import ModelLoadError
    from shared.engine.model.config import ModelConfig

    base = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 300, "sliding_window": 16}
    for extra, window in [({}, None), ({"use_sliding_window": True, "max_window_layers": 2}, None),
                          ({"use_sliding_window": True, "max_window_layers": 0}, 16)]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        assert ModelConfig.from_dir(tmp_path).sliding_window == window
    (tmp_path / "config.json").write_text(json.dumps({**base, "use_sliding_window": True, "max_window_layers": 1}))
    with pytest.raises(ModelLoadError, match="max_window_layers"):
        ModelConfig.from_dir(tmp_path)


def test_phi3_longrope_is_served_up_to_its_pretrained_length_and_partial_rope_is_refused(tmp_path, caplog):
    from shared.engine.model import ModelLoadError
    from shared.engine.model.config import ModelConfig

    longrope = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}  # Phi-3.5's 4.x layout
    base = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 300,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_scaling": longrope}
    (tmp_path / "config.json").write_text(json.dumps(base))
    with caplog.at_level(logging.INFO):
        cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.max_position_embeddings == 4096 and "serving up to original_max_position_embeddings = 4096" in caplog.text
    assert cfg.rope_attention_factor() == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    for change, message in [
        ({"rope_scaling": {**longrope, "short_factor": [1.0] * 7}}, "short_factor must list 8 factors"),
        ({"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
        # transformers 5.x's layout: the factor inside rope_parameters, with the default RoPE
        ({"rope_scaling": None, "partial_rotary_factor": None,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
         "partial_rotary_factor 0.75"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ModelLoadError, match=message):
            ModelConfig.from_dir(tmp_path)
    # the pretrained length: the config's own field before the scaling's, 4096 (Phi3Config's) without either
    scaling = {**longrope, "original_max_position_embeddings": 8192}
    for change, original in [({"rope_scaling": scaling}, 4096), ({"rope_scaling": scaling, "original_max_position_embeddings": None}, 8192),
                             ({"original_max_position_embeddings": None}, 4096)]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        assert ModelConfig.from_dir(tmp_path).max_position_embeddings == original


def test_gemma3_reads_both_config_layouts_and_refuses_what_it_lacks(tmp_path):
    from shared.engine.model import ModelLoadError
    from shared.engine.model.config import ModelConfig

    # gemma-3-1b-it's shape in transformers 4.x's layout: every 6th layer global, rope_local_base_freq
    base = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "head_dim": 256,
            "num_key_value_heads": 1, "intermediate_size": 128, "num_hidden_layers": 7, "vocab_size": 300,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
            "rope_local_base_freq": 1e4, "rope_scaling": None, "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": None, "attn_logit_softcapping": None}
    (tmp_path / "config.json").write_text(json.dumps(base))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.layer_windows == [512] * 5 + [None] + [512] and cfg.sliding_window is None
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.attn_scale) == (1e6, 1e4, 256 ** -0.5)
    assert cfg.tie_word_embeddings and cfg.qk_norm and cfg.norm_offset and cfg.embed_scale == 8.0
    # keys a config leaves out take Gemma3TextConfig's defaults
    sparse = {k: v for k, v in base.items() if k not in ("head_dim", "query_pre_attn_scalar", "sliding_window")}
    (tmp_path / "config.json").write_text(json.dumps(sparse))
    cfg = ModelConfig.from_dir(tmp_path)
    assert (cfg.head_dim, cfg.attn_scale, cfg.layer_windows[0]) == (256, 256 ** -0.5, 4096)
    # Gemma 2's soft-capping, and an activation other than GELU (tanh), are refused by name
    for change, message in [({"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0"),
                            ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                            ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
                            ({"layer_types": ["full_attention"]}, "layer_types")]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ModelLoadError, match=message):
            ModelConfig.from_dir(tmp_path)
