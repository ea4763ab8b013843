"""Weights from `model.safetensors` or sharded `model-*.safetensors` + index, into a module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import ModelLoadError


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"missing shard(s) listed in {index}: {', '.join(missing)}")
    else:
        raise ModelLoadError(f"missing file {single} (or a sharded model.safetensors.index.json) in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_weights(module: torch.nn.Module, model_dir: str | Path, tie_word_embeddings: bool) -> None:
    """Copy checkpoint tensors into `module` (already on its device and dtype)."""
    state = load_state_dict(model_dir)
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {name for name, _ in module.named_parameters()}
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks tensors: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in params:
                continue  # e.g. rotary inv_freq buffers some checkpoints carry
            p = params[name]
            if p.shape != tensor.shape:
                raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(p.shape)}")
            p.copy_(tensor.to(dtype=p.dtype))
