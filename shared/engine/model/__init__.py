"""Llama-family model: config, weights, paged-attention forward."""

from .attention import AttentionMetadata, DecodeGroup, GpuBatch, PrefillSeq
from .config import ModelConfig, ModelLoadError
from .llama import LlamaForCausalLM
from .loader import load_weights

__all__ = ["AttentionMetadata", "DecodeGroup", "GpuBatch", "PrefillSeq", "ModelConfig", "ModelLoadError", "LlamaForCausalLM", "load_weights"]
