"""Tandem's inference engine: pure PyTorch, no gRPC, no text (token ids in, token ids out)."""

from shared.params import FinishReason, InvalidRequest, RequestOutput, SamplingParams, TokenLogprobs

from .async_engine import AsyncEngine, EngineDeadError
from .engine import EngineConfig, EngineStats, KVCacheTooSmall, LLMEngine
from .interface import (
    KV_HANDOFF_ENGINE,
    KV_HANDOFF_TENSORS,
    EngineClient,
    EngineInfo,
    FirstToken,
    KvPieceIn,
    Prefilled,
    PrefillOutput,
    Reservation,
)
from .model import ModelConfig, ModelLoadError

__all__ = [
    "AsyncEngine", "EngineDeadError", "EngineConfig", "EngineStats", "KVCacheTooSmall", "LLMEngine", "ModelConfig", "ModelLoadError",
    "FinishReason", "InvalidRequest", "RequestOutput", "SamplingParams", "TokenLogprobs",
    "EngineClient", "EngineInfo", "FirstToken", "KvPieceIn", "Prefilled", "PrefillOutput", "Reservation",
    "KV_HANDOFF_ENGINE", "KV_HANDOFF_TENSORS",
]
