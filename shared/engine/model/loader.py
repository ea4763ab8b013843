"""Weights from `model.safetensors` or sharded `model-*.safetensors` + index, into a module;
failing those, from PyTorch's `pytorch_model.bin` (or its shards + index), as older
checkpoints ship them, read with `torch.load(weights_only=True)`: tensors only, no code.

An int8 parameter of the module (quant.Int8Linear / Int8Embedding) takes the checkpoint's
float tensor quantized per output channel, its scale going to `<name>_scale`. A checkpoint
that is already int8 with per-channel scales (compressed-tensors' int8 weight-only layout:
`weight` int8 [N, K], `weight_scale` [N, 1]) loads as it is, or dequantized into a float model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import ModelLoadError
from .quant import dequantize_weight, quantize_weight


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - a pickle with code in it, or not a checkpoint at all
        raise ModelLoadError(
            f"cannot read {path} as tensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "convert the checkpoint to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} is not a state dict of tensors; convert the checkpoint to safetensors")
    return state


# (single file, index of shards, how to read one file), in the order a checkpoint is looked up
FORMATS = (
    ("model.safetensors", "model.safetensors.index.json", _load_safetensors),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_bin),
)


def checkpoint_files(model_dir: str | Path) -> tuple[list[Path], Callable[[Path], dict[str, torch.Tensor]]]:
    """The weight files of the checkpoint in `model_dir` and the function that reads one."""
    model_dir = Path(model_dir)
    for single_name, index_name, read in FORMATS:
        single, index = model_dir / single_name, model_dir / index_name
        if single.is_file():
            return [single], read
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"missing shard(s) listed in {index}: {', '.join(missing)}")
            return files, read
    raise ModelLoadError(
        f"missing file {model_dir / 'model.safetensors'} (or a sharded model.safetensors.index.json, or "
        f"PyTorch's pytorch_model.bin) in {model_dir}"
    )


def load_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    files, read = checkpoint_files(model_dir)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read(f))
    return state


# checkpoints that store projections fused (Phi-3): the fused tensor, and the parts it stacks along
# its output rows, in order; the tensors of a projection that have one row per output
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PER_ROW = (".weight", ".bias", ".weight_scale", ".weight_zero_point")


def split_fused(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint with each fused projection (and its int8 per-channel scale) split into the
    module's separate ones, by their row counts."""
    out = {}
    for name, tensor in state.items():
        stem, fused, suffix = _fused_name(name)
        if fused is None or suffix not in PER_ROW:  # other tensors (an activation scale) are not split
            out[name] = tensor
            continue
        parts = [f"{stem}{part}.weight" for part in FUSED[fused]]
        if not all(p in params for p in parts):
            raise ModelLoadError(f"{name}: a fused projection the model has no parts for")
        rows = [params[p].shape[0] for p in parts]
        if tensor.dim() == 0 or tensor.shape[0] != sum(rows):
            have = tensor.shape[0] if tensor.dim() else 0
            raise ModelLoadError(f"{name}: {have} rows, not {' + '.join(map(str, rows))}")
        for part, piece in zip(FUSED[fused], torch.split(tensor, rows), strict=True):
            out[f"{stem}{part}{suffix}"] = piece
    return out


def _fused_name(name: str) -> tuple[str, str | None, str]:
    """("model.layers.0.self_attn.", "qkv_proj", ".weight") for a fused tensor's name, else (name, None, "")."""
    for fused in FUSED:
        marker = f".{fused}."
        if marker in name:
            stem, suffix = name.split(marker, 1)
            return stem + ".", fused, "." + suffix
    return name, None, ""


def load_weights(
    module: torch.nn.Module, model_dir: str | Path, tie_word_embeddings: bool, norm_offset: bool = False
) -> None:
    """Copy checkpoint tensors into `module` (already on its device and dtype). `norm_offset`: the
    checkpoint stores RMSNorm weights as offsets from 1 (Gemma), added here in float32."""
    state = split_fused(load_state_dict(model_dir), dict(module.named_parameters()))
    if norm_offset:
        state = {k: v.float() + 1 if k.endswith("norm.weight") else v for k, v in state.items()}
    if tie_word_embeddings:
        state.pop("lm_head.weight", None)
    scale_names = {name + "_scale" for name, p in module.named_parameters() if p.dtype == torch.int8}
    expected = {name for name, _ in module.named_parameters() if name not in scale_names}
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks tensors: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in params or name in scale_names:
                continue  # e.g. rotary inv_freq buffers some checkpoints carry; scales go with their weight
            p = params[name]
            if p.shape != tensor.shape:
                raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(p.shape)}")
            if tensor.dtype == torch.int8:
                scale = state.get(name + "_scale")
                if scale is None or scale.numel() != tensor.shape[0]:
                    raise ModelLoadError(f"{name}: int8 in the checkpoint without a per-channel {name}_scale")
                zero = state.get(name + "_zero_point")
                if zero is not None and bool(zero.any()):
                    raise ModelLoadError(f"{name}: asymmetric int8 (nonzero {name}_zero_point) is not supported")
                scale = scale.reshape(-1).float()
                if p.dtype == torch.int8:
                    p.copy_(tensor)
                    params[name + "_scale"].copy_(scale)
                else:
                    p.copy_(dequantize_weight(tensor, scale, p.dtype))
            elif p.dtype == torch.int8:
                q, scale = quantize_weight(tensor)
                p.copy_(q)
                params[name + "_scale"].copy_(scale)
            else:
                p.copy_(tensor.to(dtype=p.dtype))
