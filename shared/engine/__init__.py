"""Tandem's inference engine: pure PyTorch, no gRPC, no text (token ids in, token ids out)."""

from .engine import EngineConfig, EngineStats, LLMEngine
from .model import ModelConfig, ModelLoadError
from .params import FinishReason, InvalidRequest, RequestOutput, SamplingParams, TokenLogprobs

__all__ = [
    "EngineConfig", "EngineStats", "LLMEngine", "ModelConfig", "ModelLoadError",
    "FinishReason", "InvalidRequest", "RequestOutput", "SamplingParams", "TokenLogprobs",
]
