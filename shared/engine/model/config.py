"""Model configuration read from a Hugging Face checkpoint directory.

Knows the Llama family's `config.json` dialects (Llama, Llama 3 RoPE scaling, Qwen2 QKV bias,
Qwen3 per-head QK RMSNorm, Mistral sliding window, Phi-3 LongRoPE; transformers 4.x `rope_scaling` and 5.x
`rope_parameters`). Knows nothing about weights or tensors beyond the RoPE frequencies.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",  # Llama's layers with fused qkv_proj / gate_up_proj (the loader splits them)
}
log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The checkpoint directory cannot be served: the message names the file or field."""


@dataclass
class ModelConfig:
    name: str
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "phi3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    rope_theta: float
    rope_scaling: dict | None
    sliding_window: int | None
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"missing file {path} (expected a Hugging Face checkpoint directory)")
        raw = json.loads(path.read_text())
        archs = raw.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or None
        rope_theta = raw.get("rope_theta") or (rope_params or {}).get("rope_theta") or 10000.0
        partial = raw.get("partial_rotary_factor") or (rope_params or {}).get("partial_rotary_factor") or 1.0
        if rope_params is not None and rope_params.get("rope_type", rope_params.get("type", "default")) == "default":
            rope_params = None
        if partial != 1.0:
            raise ModelLoadError(
                f"{path}: partial_rotary_factor {partial} (RoPE on part of each head, as in Phi-4-mini) is not supported"
            )
        max_positions = raw.get("max_position_embeddings", 2048)
        if rope_params is not None and rope_params.get("rope_type", rope_params.get("type")) in ("longrope", "su"):
            rope_params, max_positions = _longrope(path, raw, rope_params, max_positions)
        sliding = raw.get("sliding_window")
        if arch in ("qwen2", "qwen3"):
            # transformers: layers from max_window_layers on use the window, the ones before it do not
            layers, first_windowed = raw["num_hidden_layers"], raw.get("max_window_layers", 28)  # its default
            if not raw.get("use_sliding_window", False) or first_windowed >= layers:
                sliding = None
            elif first_windowed > 0 and sliding is not None:
                raise ModelLoadError(
                    f"{path}: sliding_window on layers {first_windowed}-{layers - 1} only (max_window_layers); "
                    "a window on some layers and not others is not supported"
                )
        eos = _as_list(raw.get("eos_token_id"))
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            gen = json.loads(gen_path.read_text())
            eos = _as_list(gen.get("eos_token_id")) or eos
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            name=model_dir.resolve().name,
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attention_bias,
            o_bias=attention_bias and arch != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            rope_theta=float(rope_theta),
            rope_scaling=rope_params,
            sliding_window=sliding,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse RoPE frequencies [head_dim // 2], with Llama 3 / linear / LongRoPE scaling applied."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None:
            return inv_freq
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        factor = float(self.rope_scaling.get("factor", 1.0))
        if kind == "linear":
            return inv_freq / factor
        if kind in ("longrope", "su"):  # within the original length: the short factors, as transformers
            return inv_freq / torch.tensor(self.rope_scaling["short_factor"], dtype=torch.float32)
        if kind == "llama3":
            low = float(self.rope_scaling["low_freq_factor"])
            high = float(self.rope_scaling["high_freq_factor"])
            old_len = float(self.rope_scaling["original_max_position_embeddings"])
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv_freq
            # long wavelengths are divided by factor, short ones kept, the band between interpolated
            scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        raise ModelLoadError(
            f"config.json: unsupported rope scaling type {kind!r} (supported: linear, llama3, longrope)"
        )

    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise)."""
        return float((self.rope_scaling or {}).get("attention_factor", 1.0))


def _longrope(path: Path, raw: dict, rope: dict, max_positions: int) -> tuple[dict, int]:
    """Phi-3's LongRoPE as transformers computes it: the short factors up to the pretrained length
    (original_max_position_embeddings), the long ones past it, cos and sin scaled by an attention
    factor from max_position_embeddings / that length. Past it transformers changes the factors
    of every position, the cached ones included, which a KV cache cannot follow: the model is
    served up to that length, where its outputs are transformers'."""
    # as transformers' Phi3Config: its own field first, 4096 when it has none
    original = raw.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or 4096
    dim = (raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]) // 2
    for name in ("short_factor", "long_factor"):
        if len(rope.get(name) or []) != dim:
            raise ModelLoadError(f"{path}: longrope {name} must list {dim} factors (head_dim / 2)")
    factor = rope.get("factor") or max_positions / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    if max_positions > original:
        log.info(
            "%s: LongRoPE; serving up to original_max_position_embeddings = %d positions (of %d), where "
            "transformers uses the short factors for every position", path.parent.name, original, max_positions,
        )
    return {**rope, "attention_factor": attention}, min(max_positions, original)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
