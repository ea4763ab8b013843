"""Llama-family decoder (Llama, Llama 3, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameter names match Hugging Face checkpoints so weights load without renaming.
Input is a flat batch of tokens from many sequences; `AttentionMetadata` says which
token belongs where. Knows nothing about scheduling, sampling or tokenization.
With quantization="int8" every linear layer (and a tied embedding) holds int8 weights with
per-output-channel scales (quant.py); the checkpoint names stay the same.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .attention import AttentionMetadata, paged_attention, write_kv
from .config import ModelConfig
from .quant import QUANTIZATIONS, Int8Embedding, Int8Linear, int8_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.fused_ok(x) and self.weight.dtype == torch.float32:
            return cpu_kernels.load().rms_norm(x.contiguous(), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype == torch.float32 and dtype != torch.float32:
            return (x * self.weight).to(dtype)  # Gemma's order: scaled in float32, rounded once
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        self.register_buffer("inv_freq", cfg.rope_inv_freq(local), persistent=False)
        # LongRoPE scales cos and sin; the windowed layers' own RoPE (Gemma 3) has no scaling
        self.attention_factor = 1.0 if local else cfg.rope_attention_factor()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; rotate_half convention (HF), not interleaved pairs
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """nn.Linear whose float32 CPU products of up to SMALL_LINEAR_MAX_ROWS rows (decode steps,
    speculative verification) run through cpu_kernels.small_linear: the weight read once for all
    rows, and each row's result independent of how many share the step."""

    _small: bool | None = None  # whether the kernel takes this weight (decided on first use)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.small_rows(x):
            if self._small is None:
                self._small = cpu_kernels.small_linear_ok(self.weight)
            if self._small:
                return cpu_kernels.small_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def linear(in_features: int, out_features: int, bias: bool, quantization: str) -> nn.Module:
    if quantization == "int8":
        return Int8Linear(in_features, out_features, bias)
    return Linear(in_features, out_features, bias=bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = linear(h, q, cfg.qkv_bias, quantization)
        self.k_proj = linear(h, kv, cfg.qkv_bias, quantization)
        self.v_proj = linear(h, kv, cfg.qkv_bias, quantization)
        self.o_proj = linear(q, h, cfg.o_bias, quantization)
        if cfg.qk_norm:  # Qwen3: each head of q and k is RMS-normalised before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cpu_kernels.fused_ok(q):
            cpu_kernels.load().rope_(q, k, cos[:, 0], sin[:, 0])  # in place; q, k are fresh projections
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, quantization)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, quantization)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, quantization)

        self.gelu = cfg.hidden_act == "gelu_tanh"  # Gemma

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.gelu:
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        if cpu_kernels.fused_ok(gate):
            return self.down_proj(cpu_kernels.load().silu_and_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str):
        super().__init__()
        self.self_attn = Attention(cfg, quantization)
        self.mlp = MLP(cfg, quantization)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma: post_attention_layernorm normalises the attention's output instead
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        if self.sandwich:
            x = x + self.post_attention_layernorm(
                self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
            )
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str):
        super().__init__()
        # a tied embedding is also the LM head: int8 then, so that only one (int8) table exists
        if quantization == "int8" and cfg.tie_word_embeddings:
            self.embed_tokens = Int8Embedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, quantization) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, quantization: str = "none"):
        super().__init__()
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.config = cfg
        self.quantization = quantization
        self.model = Backbone(cfg, quantization)
        self.rotary = RotaryEmbedding(cfg)
        # Gemma 3: windowed layers have a RoPE base of their own
        self.local_rotary = RotaryEmbedding(cfg, local=True) if cfg.local_rope_theta is not None else None
        self.lm_head = None if cfg.tie_word_embeddings else linear(cfg.hidden_size, cfg.vocab_size, False, quantization)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [L, 2, num_blocks, block_size, Hkv, D] -> hidden [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        rope = self.rotary(positions, x.dtype)
        inputs = [(rope, meta)] * len(self.model.layers)
        if self.config.layer_windows is not None:  # Gemma 3: a windowed layer has its own RoPE base
            local = self.local_rotary(positions, x.dtype) if self.local_rotary is not None else rope
            metas = {w: dataclasses.replace(meta, sliding_window=w) for w in set(self.config.layer_windows)}
            inputs = [(rope if w is None else local, metas[w]) for w in self.config.layer_windows]
        for i, (layer, ((cos, sin), layer_meta)) in enumerate(zip(self.model.layers, inputs, strict=True)):
            x = layer(x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], layer_meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        embed = self.model.embed_tokens
        if self.lm_head is None and isinstance(embed, Int8Embedding):
            return int8_linear(hidden, embed.weight, embed.weight_scale).float()
        if isinstance(self.lm_head, Int8Linear):
            return self.lm_head(hidden).float()
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        weight = self.model.embed_tokens.weight  # tied: the embedding is the LM head
        if cpu_kernels.small_rows(hidden) and cpu_kernels.small_linear_ok(weight):
            return cpu_kernels.small_linear(hidden, weight, None)
        return F.linear(hidden, weight).float()
