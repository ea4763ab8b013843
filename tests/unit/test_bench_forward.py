"""`make bench-forward`: the small-row linear kernel and torch's linear timed side by side, and
the switch between them really switching (the kernel's calls counted)."""

from __future__ import annotations

import json

import pytest
import torch

from shared.engine.model import cpu_kernels
from tests.helpers.models import make_tiny_checkpoint
from tools.bench import forward

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None or cpu_kernels.small_linear_width() == 0, reason="no small-row linear kernel here"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bench-fwd"), hidden=64, tie=True)


def test_the_switch_turns_the_kernel_on_and_off_for_every_linear_and_the_tied_head(tiny, monkeypatch):
    from shared.engine import EngineConfig, LLMEngine
    from shared.engine.runner import SeqInput

    engine = LLMEngine(EngineConfig(model=str(tiny), num_blocks=32, max_num_seqs=2, dtype="float32"))
    calls = []
    real = cpu_kernels.small_linear
    monkeypatch.setattr(cpu_kernels, "small_linear", lambda *a: calls.append(1) or real(*a))
    seq = SeqInput(list(range(3, 40)), 30, 3, list(range(8)))
    out = {}
    for on in (True, False, True):
        calls.clear()
        with forward.small_linear(engine.runner.model, on):
            out[on] = engine.runner.forward([seq], [], [3])
        layers = engine.model_config.num_layers
        assert len(calls) == ((7 * layers + 1) if on else 0)  # q, k, v, o, gate, up, down per layer; the LM head
    torch.testing.assert_close(out[True], out[False], atol=1e-4, rtol=1e-4)


def test_the_bench_writes_both_variants_for_every_shape(tiny, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    forward.add_parser(parser.add_subparsers())
    args = parser.parse_args(["forward", "--model", str(tiny), "--rounds", "2", "--context", "32",
                              "--out-dir", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    result = json.loads((tmp_path / "forward.json").read_text())
    assert [r["shape"] for r in result["rows"]] == [f"{k} {n}" for k, n in forward.SHAPES]
    assert all(r["kernel_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
    assert "| verify 5 | 5 |" in (tmp_path / "forward.md").read_text()
