"""GPU defaults decided without a GPU: bfloat16 on CUDA unless TANDEM_DTYPE says otherwise, and the
KV cache sized from the memory the weights left free (or the bytes asked for)."""

from __future__ import annotations

import pytest
import torch

from shared.config import ConfigError, WorkerConfig, from_env
from shared.engine import EngineConfig
from shared.engine.engine import kv_cache_budget


@pytest.mark.parametrize("device, env_dtype, expected", [
    ("cuda", None, "bfloat16"), ("cuda:1", None, "bfloat16"), ("cpu", None, "float32"),
    ("cuda", "float32", "float32"), ("cpu", "bfloat16", "bfloat16"),
])
def test_dtype_default_follows_the_device(device, env_dtype, expected):
    env = {"TANDEM_MODEL": "/m", "TANDEM_DEVICE": device}
    if env_dtype:
        env["TANDEM_DTYPE"] = env_dtype
    config = from_env(WorkerConfig, env, {"role": "decode"})
    assert config.dtype == expected and config.engine_kwargs()["dtype"] == expected


def test_kv_cache_settings_reach_the_engine():
    env = {"TANDEM_MODEL": "/m", "TANDEM_DEVICE": "cuda", "TANDEM_KV_CACHE_MEMORY_FRACTION": "0.5",
           "TANDEM_CUDA_GRAPHS": "false"}
    kwargs = from_env(WorkerConfig, env, {"role": "decode"}).engine_kwargs()
    assert kwargs["kv_cache_memory_fraction"] == 0.5 and kwargs["cuda_graphs"] is False
    with pytest.raises(ConfigError, match="TANDEM_KV_CACHE_MEMORY_FRACTION"):
        from_env(WorkerConfig, {**env, "TANDEM_KV_CACHE_MEMORY_FRACTION": "1.5"}, {"role": "decode"})


def test_kv_cache_budget():
    def free_memory(device):  # (free, total) as torch.cuda.mem_get_info reports it, weights loaded
        return 60 << 30, 140 << 30

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kv_cache_budget(EngineConfig(model="m"), cuda, free_memory) == int((60 << 30) * 0.85)
    assert kv_cache_budget(EngineConfig(model="m", kv_cache_memory_fraction=0.5), cuda, free_memory) == 30 << 30
    assert kv_cache_budget(EngineConfig(model="m", kv_cache_memory=5 << 30), cuda, free_memory) == 5 << 30
    assert kv_cache_budget(EngineConfig(model="m"), cpu, free_memory) == 1 << 30
    assert kv_cache_budget(EngineConfig(model="m", kv_cache_memory=123), cpu, free_memory) == 123
    with pytest.raises(ValueError, match="kv_cache_memory_fraction"):
        EngineConfig(model="m", kv_cache_memory_fraction=0).validate()
