"""Llama-shaped checkpoints with random weights, built locally for tools/gpu_check.py (no download).

`build(path, "1b" | "8b", device)` writes config.json + bfloat16 *.safetensors in Hugging Face's
layout with the shapes of Llama-3.2-1B (16 layers, hidden 2048, 32 heads / 8 KV heads, tied
embeddings) or Llama-3.1-8B (32 layers, hidden 4096, untied), Llama 3 RoPE scaling and the
128256-token vocabulary, plus a small tokenizer trained on the spot (tests/helpers/tokenizers.py):
the engine and HF transformers work on token ids, so the tokenizer only has to exist. Weights
are drawn on the device (seconds, even for 8B) and saved from the CPU. `tiny=True` gives two-layer
stand-ins of the same families for the CPU smoke test.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_factor=32.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_factor=8.0),
}
TINY = {
    "1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_factor=32.0),
    "8b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_factor=8.0),
}


def config(shape: str, tiny: bool = False):
    import transformers

    from tests.helpers.tokenizers import BOS_ID, EOS_ID, VOCAB_SIZE

    s = dict((TINY if tiny else SHAPES)[shape])
    factor = s.pop("rope_factor")
    return transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE if tiny else 128256,
        max_position_embeddings=512 if tiny else 131072,
        rms_norm_eps=1e-5,
        # wider than HF's 0.02: peakier next-token distributions, so that greedy parity does not
        # hinge on float rounding of near-ties between random logits
        initializer_range=0.05,
        bos_token_id=BOS_ID if tiny else 128000,
        eos_token_id=EOS_ID if tiny else 128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64 if tiny else 8192},
        **s,
    )


def build(path: Path, shape: str, device: str, tiny: bool = False) -> Path:
    import transformers

    from tests.helpers.tokenizers import make_tokenizer_dir

    path = Path(path)
    make_tokenizer_dir(path)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config(shape, tiny))
    model = model.to(torch.bfloat16).to("cpu").eval()
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    return path


def ensure_structlog() -> None:
    """A GPU image may lack structlog, the services' logging library; shared.engine imports it for
    AsyncEngine (which the check does not run). Stand in the standard library's loggers then."""
    if importlib.util.find_spec("structlog") is None:
        stub = types.ModuleType("structlog")
        stub.get_logger = logging.getLogger  # type: ignore[attr-defined]
        sys.modules["structlog"] = stub
