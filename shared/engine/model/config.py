"""Model configuration read from a Hugging Face checkpoint directory.

Knows the Llama family's `config.json` dialects (Llama, Llama 3 RoPE scaling, Qwen2 QKV bias,
Qwen3 per-head QK RMSNorm, Mistral sliding window, Phi-3 LongRoPE, Gemma 3's text model; transformers 4.x
`rope_scaling` and 5.x `rope_parameters`). Knows nothing about weights or tensors beyond the RoPE frequencies.
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
    "Gemma3ForCausalLM": "gemma3",  # Gemma 3's text-only models (1B, 270M); see _gemma3
}
log = logging.getLogger(__name__)
GEMMA3_HEAD_DIM = 256  # Gemma3TextConfig's default head_dim (and query_pre_attn_scalar)


class ModelLoadError(ValueError):
    """The checkpoint directory cannot be served: the message names the file or field."""


@dataclass
class ModelConfig:
    name: str
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma3"
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
    # Gemma 3's differences from the Llama layer (defaults: Llama's)
    layer_windows: list[int | None] | None = None  # each layer's sliding window (None: sliding_window for all)
    local_rope_theta: float | None = None  # RoPE base of the windowed layers (None: rope_theta for all)
    norm_offset: bool = False  # RMSNorm scales by 1 + weight (the loader adds the 1)
    embed_scale: float | None = None  # the embedding is multiplied by it
    sandwich_norms: bool = False  # norms after attention and MLP too, before their residual adds
    hidden_act: str = "silu"  # the MLP's gate activation: silu | gelu_tanh
    attn_scale: float | None = None  # softmax scale (None: head_dim ** -0.5)

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
        head_dim = raw.get("head_dim") or (GEMMA3_HEAD_DIM if arch == "gemma3" else hidden // heads)
        gemma = _gemma3(path, raw) if arch == "gemma3" else {}
        rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or None
        if gemma:
            rope_params = gemma.pop("rope_params")
        rope_theta = gemma.pop("rope_theta", None) or raw.get("rope_theta") or (rope_params or {}).get("rope_theta") or 10000.0
        partial = raw.get("partial_rotary_factor") or (rope_params or {}).get("partial_rotary_factor") or 1.0
        if rope_params is not None and _rope_type(rope_params) == "default":
            rope_params = None
        if partial != 1.0:
            raise ModelLoadError(
                f"{path}: partial_rotary_factor {partial} (RoPE on part of each head, as in Phi-4-mini) is not supported"
            )
        max_positions = raw.get("max_position_embeddings", 2048)
        if rope_params is not None and _rope_type(rope_params) in ("longrope", "su"):
            rope_params, max_positions = _longrope(path, raw, rope_params, max_positions, head_dim)
        sliding = None if gemma else raw.get("sliding_window")  # Gemma 3: per layer, in layer_windows
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
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch == "gemma3")),
            qkv_bias=arch == "qwen2" or attention_bias,
            o_bias=attention_bias and arch != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch in ("qwen3", "gemma3"),
            rope_theta=float(rope_theta),
            rope_scaling=rope_params,
            sliding_window=sliding,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            **gemma,
        )

    def rope_inv_freq(self, local: bool = False) -> torch.Tensor:
        """Inverse RoPE frequencies [head_dim // 2], with Llama 3 / linear / LongRoPE scaling applied;
        `local`: those of the windowed layers of a model that gives them their own base (unscaled)."""
        dim = self.head_dim
        theta = self.local_rope_theta if local else self.rope_theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None or local:
            return inv_freq
        kind = _rope_type(self.rope_scaling)
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


def _gemma3(path: Path, raw: dict) -> dict:
    """Gemma 3's text model: the Llama layer with RMSNorm scaling by 1 + weight, the embedding
    scaled by sqrt(hidden_size), norms after attention and MLP as well as before, per-head q / k
    norms, a GELU (tanh) gate, softmax scaled by query_pre_attn_scalar, and a sliding window on
    most layers (layer_types, or every sliding_window_pattern-th layer global) whose RoPE has its
    own base. The fields of ModelConfig, plus rope_params / rope_theta (the global layers')."""
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(name) is not None:
            raise ModelLoadError(f"{path}: {name} {raw[name]} (Gemma 2's soft-capping) is not supported")
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{path}: use_bidirectional_attention is not supported")
    layers = raw["num_hidden_layers"]
    pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6
    types = raw.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        raise ModelLoadError(f"{path}: layer_types must give full_attention or sliding_attention for each layer")
    window = raw.get("sliding_window") or 4096  # Gemma3TextConfig's defaults, here and below
    rope = raw.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5.x: one RoPE per layer type
        full, local = rope["full_attention"], rope.get("sliding_attention") or {}
        theta, local_theta = full.get("rope_theta", 1e6), local.get("rope_theta", 10000.0)
    else:  # 4.x: rope_theta and rope_scaling for the global layers, rope_local_base_freq for the others
        full, local = raw.get("rope_scaling") or {}, {}
        theta, local_theta = raw.get("rope_theta", 1e6), raw.get("rope_local_base_freq", 10000.0)
    if _rope_type(local) != "default":
        raise ModelLoadError(f"{path}: RoPE scaling on the sliding-window layers is not supported")
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"{path}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    return {
        "rope_params": full if _rope_type(full) != "default" else None,
        "rope_theta": float(theta),
        "local_rope_theta": float(local_theta),
        "layer_windows": [window if t == "sliding_attention" else None for t in types],
        "norm_offset": True,
        "embed_scale": raw["hidden_size"] ** 0.5,
        "sandwich_norms": True,
        "hidden_act": "gelu_tanh",
        "attn_scale": float(raw.get("query_pre_attn_scalar") or GEMMA3_HEAD_DIM) ** -0.5,
    }


def _rope_type(params: dict) -> str:
    """A RoPE parameter dict's type: rope_type (transformers 5.x) or type (4.x); default when neither."""
    return params.get("rope_type", params.get("type", "default"))


def _longrope(path: Path, raw: dict, rope: dict, max_positions: int, head_dim: int) -> tuple[dict, int]:
    """Phi-3's LongRoPE as transformers computes it: the short factors up to the pretrained length
    (original_max_position_embeddings), the long ones past it, cos and sin scaled by an attention
    factor from max_position_embeddings / that length. Past it transformers changes the factors
    of every position, the cached ones included, which a KV cache cannot follow: the model is
    served up to that length, where its outputs are transformers'."""
    # as transformers' Phi3Config: its own field first, 4096 when it has none
    original = raw.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or 4096
    dim = head_dim // 2
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
