"""tools/gpu_check.py runs end to end on CPU with tiny models (--device cpu --tiny), so its first
GPU run does not fail for a reason a CPU could have shown: every step, every row of the table."""

from __future__ import annotations

import json

from tools import gpu_check


def test_gpu_check_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--workdir", str(tmp_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    for row in ("copy bandwidth (read+write)", "greedy parity with HF (1B-shaped, float32)",
                "batch-1 decode, 1B-shaped", "batch-1 decode, 8B-shaped", "saturation: engine output tok/s",
                "  vs HF one at a time", "decode step, eager -> CUDA graphs (1B)"):
        assert row in data, row
    assert data["greedy parity with HF (1B-shaped, float32)"]["verdict"] == "all identical: ok"
    assert "| check | result | goal / verdict |" in printed


def test_gpu_check_refuses_cuda_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--tiny"]) == 2
    assert "--device cpu --tiny" in capsys.readouterr().err
