"""Checkpoints that store projections fused (Phi-3's qkv_proj, gate_up_proj): split at load into
the model's separate projections by their row counts, weights, biases and int8 scales alike."""

from __future__ import annotations

import pytest
import torch

from shared.engine.model import ModelLoadError
from shared.engine.model.loader import split_fused

PARAMS = {
    "model.layers.0.self_attn.q_proj.weight": torch.empty(8, 4),
    "model.layers.0.self_attn.k_proj.weight": torch.empty(2, 4),
    "model.layers.0.self_attn.v_proj.weight": torch.empty(2, 4),
    "model.layers.0.mlp.gate_proj.weight": torch.empty(6, 4),
    "model.layers.0.mlp.up_proj.weight": torch.empty(6, 4),
}


def test_fused_projections_are_split_in_order():
    qkv = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)
    gate_up = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4) + 1000
    state = {
        "model.layers.0.self_attn.qkv_proj.weight": qkv,
        "model.layers.0.self_attn.qkv_proj.weight_scale": torch.arange(12.0),  # an int8 checkpoint's scales
        "model.layers.0.mlp.gate_up_proj.weight": gate_up,
        "model.norm.weight": torch.ones(4),
    }
    out = split_fused(state, PARAMS)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], qkv[:8])
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], qkv[8:10])
    assert torch.equal(out["model.layers.0.self_attn.v_proj.weight"], qkv[10:])
    assert torch.equal(out["model.layers.0.self_attn.v_proj.weight_scale"], torch.tensor([10.0, 11.0]))
    assert torch.equal(out["model.layers.0.mlp.gate_proj.weight"], gate_up[:6])  # gate first, as transformers
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], gate_up[6:])
    assert torch.equal(out["model.norm.weight"], torch.ones(4)) and not any("qkv" in k for k in out)


def test_a_fused_tensor_of_the_wrong_size_names_itself():
    with pytest.raises(ModelLoadError, match=r"qkv_proj.weight: 11 rows, not 8 \+ 2 \+ 2"):
        split_fused({"model.layers.0.self_attn.qkv_proj.weight": torch.empty(11, 4)}, PARAMS)


def test_only_per_row_tensors_are_split():
    # a static activation scale of a fused projection (one number) is no row of it: passed on as it is
    scale = torch.tensor([0.5])
    out = split_fused({"model.layers.0.self_attn.qkv_proj.input_scale": scale}, PARAMS)
    assert out == {"model.layers.0.self_attn.qkv_proj.input_scale": scale}
    with pytest.raises(ModelLoadError, match="0 rows"):
        split_fused({"model.layers.0.self_attn.qkv_proj.weight_scale": torch.tensor(0.5)}, PARAMS)
