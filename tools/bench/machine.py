"""What a benchmark report says about where it ran and on what: host, load, model shape."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .workloads import ModelShape


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info(device: str, label: str | None = None) -> dict:
    """CPU model, cores, versions and GPU; `label` overrides the one-line description."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    label = label or f"{cpu}, {cores()} cores" + (f", {gpu}" if gpu else "")
    return {
        "label": label,
        "cpu": cpu,
        "cores": cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu": gpu,
    }


def loadavg() -> float | None:
    """1-minute load average of the host: other work there makes every figure slower."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def model_shape(model: Path) -> ModelShape:
    cfg = json.loads((model / "config.json").read_text())
    tokenizer = model / "tokenizer.json"
    return ModelShape(
        _vocab_size(model, cfg),
        cfg.get("max_position_embeddings", 2048),
        cfg.get("bos_token_id"),
        str(tokenizer) if tokenizer.is_file() else None,
    )


def _vocab_size(model: Path, cfg: dict) -> int:
    """Ids every side accepts: the scheduler checks prompts against the tokenizer, the engine the model."""
    size = cfg["vocab_size"]
    if (model / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        size = min(size, Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size())
    return size
