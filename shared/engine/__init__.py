"""Tandem's inference engine: pure PyTorch, no gRPC, no text (token ids in, token ids out)."""

from shared.params import FinishReason, InvalidRequest, RequestOutput, SamplingParams, TokenLogprobs

from .async_engine import AsyncEngine, EngineDeadError
from .engine import EngineConfig, EngineStats, KVCacheTooSmall, LLMEngine
from .model import ModelConfig, ModelLoadError

__all__ = [
    "AsyncEngine", "EngineDeadError", "EngineConfig", "EngineStats", "KVCacheTooSmall", "LLMEngine", "ModelConfig", "ModelLoadError",
    "FinishReason", "InvalidRequest", "RequestOutput", "SamplingParams", "TokenLogprobs",
]
