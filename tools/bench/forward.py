"""`python -m tools.bench forward` (`make bench-forward`): one model forward of a few rows on CPU,
with the float32 small-row linear kernel (cpu_kernels.small_linear) and with torch's linear, side
by side in one run.

    python -m tools.bench forward --model models/tandem-demo-code/target

Times ModelRunner.forward for the shapes a decode worker runs with few rows: one sequence
verifying k drafts (k + 1 new tokens, the speculative step) and B sequences decoding one token
each. The two variants take turns, shape by shape and round by round, so that this host's drift
lands on both; medians over the rounds. One torch thread, as the services run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

SHAPES = (("decode", 1), ("verify", 2), ("verify", 3), ("verify", 5), ("decode", 4), ("decode", 8))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "forward",
        help="a model forward of 1-8 rows on CPU: the small-row linear kernel against torch's linear",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="models/tandem-demo-code/target")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--context", type=int, default=256, help="tokens already in each sequence's cache")
    p.add_argument("--out-dir", default="bench-results/forward")
    p.set_defaults(func=run)


@contextlib.contextmanager
def small_linear(model, enabled: bool):
    """The model's Linear layers (and a tied LM head) with the kernel on or off."""
    from shared.engine.model import cpu_kernels
    from shared.engine.model.llama import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    saved = [m._small for m in layers]
    real = cpu_kernels.small_linear_ok
    for m in layers:
        m._small = None if enabled else False
    if not enabled:
        cpu_kernels.small_linear_ok = lambda weight: False
    try:
        yield
    finally:
        cpu_kernels.small_linear_ok = real
        for m, s in zip(layers, saved, strict=True):
            m._small = s


def run(args) -> int:
    import torch

    from shared.engine import EngineConfig, LLMEngine
    from shared.engine.model import cpu_kernels
    from shared.engine.runner import SeqInput

    torch.set_num_threads(1)
    if cpu_kernels.load() is None or cpu_kernels.small_linear_width() == 0:
        print("the small-row linear kernel is not available here (no compiler, or no AVX2 / AVX-512)")
        return 1
    engine = LLMEngine(EngineConfig(model=args.model, num_blocks=256, max_num_seqs=8, enable_prefix_caching=False))
    runner = engine.runner
    if runner.dtype != torch.float32:
        print(f"the kernel is for float32 models; this one runs in {runner.dtype}")
        return 1
    bs, vocab = runner.block_size, engine.model_config.vocab_size
    per_seq = -(-(args.context + 16) // bs)
    tokens = [(7 * i + 3) % vocab for i in range(args.context + 16)]

    def call(kind: str, n: int):
        if kind == "verify":  # one sequence, n new tokens: k = n - 1 drafts and the last token
            seq = SeqInput(tokens, args.context, n, list(range(per_seq)))
            return lambda: runner.forward([seq], [], [n])
        seqs = [SeqInput(tokens, args.context, 1, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(n)]
        return lambda: runner.forward([], seqs, [1] * n)

    calls = {shape: call(*shape) for shape in SHAPES}
    times = {(shape, on): [] for shape in SHAPES for on in (True, False)}
    for fn in calls.values():  # warm both paths
        for on in (True, False):
            with small_linear(runner.model, on):
                for _ in range(3):
                    fn()
    for r in range(args.rounds):
        for shape, fn in calls.items():
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                with small_linear(runner.model, on):
                    t = time.perf_counter()
                    fn()
                    times[(shape, on)].append(time.perf_counter() - t)
    rows = []
    for shape in SHAPES:
        kernel, torch_ms = (statistics.median(times[(shape, on)]) * 1e3 for on in (True, False))
        rows.append({"shape": f"{shape[0]} {shape[1]}", "rows": shape[1], "kernel_ms": kernel, "torch_ms": torch_ms,
                     "speedup": torch_ms / kernel})  # fmt: skip
    one = next(r for r in rows if r["shape"] == "decode 1")
    for r in rows:
        r["kernel_vs_one_row"] = r["kernel_ms"] / one["kernel_ms"]
        r["torch_vs_one_row"] = r["torch_ms"] / one["torch_ms"]
    from .machine import machine_info

    result = {"command": "python -m tools.bench forward " + " ".join(_argv(args)), "model": args.model,
              "context": args.context, "rounds": args.rounds, "machine": machine_info("cpu"), "rows": rows}  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out / "forward.md").write_text(text)
    print(text)
    return 0


def _argv(args) -> list[str]:
    return ["--model", args.model, "--rounds", str(args.rounds), "--context", str(args.context)]


def markdown(result: dict) -> str:
    m = result.get("machine") or {}
    lines = [
        f"Command: `{result['command']}`; machine: {m.get('label', m.get('cpu', 'n/a'))}; one torch thread; "
        f"{result['context']} tokens of context per sequence; medians of {result['rounds']} rounds, the two "
        "variants alternating.",
        "",
        "| forward | rows | small-row kernel ms | torch linear ms | torch / kernel | kernel, vs one row | torch, vs one row |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['kernel_ms']:.2f} | {r['torch_ms']:.2f} | {r['speedup']:.2f}x "
            f"| {r['kernel_vs_one_row']:.2f}x | {r['torch_vs_one_row']:.2f}x |"
        )
    return "\n".join(lines) + "\n"
