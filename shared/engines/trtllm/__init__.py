"""TensorRT-LLM behind Tandem's engine interface (TANDEM_ENGINE=trtllm).

- config.py:  the settings, the start-up checks of TensorRT-LLM's known traps, the LLM's arguments
- convert.py: Tandem <-> TensorRT-LLM types (sampling, finish reasons, logprobs, the handoff)
- engine.py:  `TrtllmEngine`, the engine interface over `tensorrt_llm.LLM`
- drafter.py: the draft service as TensorRT-LLM's user-provided drafter

Never imports grpc; tensorrt_llm itself only inside `config.load_api()` (its image only), so the
CPU test suite runs all of it against tests/fakes/fake_tensorrt_llm.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import ModelInfo, TrtllmApi, TrtllmSettings, read_model_info
from .drafter import DraftAsk, DraftClient
from .engine import TrtllmEngine

__all__ = [
    "DraftAsk", "DraftClient", "ModelInfo", "TrtllmApi", "TrtllmEngine", "TrtllmSettings", "build_trtllm_engine",
    "read_model_info",
]


def build_trtllm_engine(config: Any, draft_client_factory: Callable[[], DraftClient] | None = None) -> TrtllmEngine:
    """Check the settings of a WorkerConfig, load the model into TensorRT-LLM, start the stats poller.

    A decode worker given `draft_client_factory` (a picklable callable opening a DraftClient)
    and TANDEM_NUM_SPECULATIVE_TOKENS > 0 speculates through TensorRT-LLM's user-provided drafter."""
    settings = TrtllmSettings.from_worker_config(config)
    factory = draft_client_factory if settings.num_speculative_tokens and config.role == "decode" else None
    engine = TrtllmEngine.build(settings, read_model_info(config.model), draft_client_factory=factory)
    return engine.start()
