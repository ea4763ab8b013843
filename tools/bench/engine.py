"""Offline throughput: Tandem's engine vs HF transformers `generate`, same model, same run.

Workload: N prompts of mixed input lengths (uniform in [min_in, max_in], seeded) drawn from
the tokenizer's vocabulary, a fixed number of output tokens each (ignore_eos). Baselines:
  - hf-one: HF `generate`, one request at a time (its throughput is a rate, so it runs on a
    subset of the prompts to keep the run short)
  - hf-static: HF `generate` on static batches of B left-padded prompts
  - tandem: all prompts submitted at once to the engine (continuous batching)
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from tools.bench.machine import loadavg, machine_info


def add_parser(sub) -> None:
    p = sub.add_parser("engine", help="offline throughput of the engine vs HF transformers")
    p.add_argument("--model", default="models/tandem-demo-code/target")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-input", type=int, default=32)
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-one-prompts", type=int, default=8, help="prompts for the one-at-a-time baseline")
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1, help="runs per system; the median is reported")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default="bench-results/engine.json")
    p.add_argument("--markdown", default=None, help="also write the report table to this Markdown file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def make_workload(vocab: int, n: int, lo: int, hi: int, seed: int, bos: int | None) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        body = [rng.randrange(3, vocab) for _ in range(length - (bos is not None))]
        prompts.append(([bos] if bos is not None else []) + body)
    return prompts


def run_tandem(args, prompts) -> float:
    from shared.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_batched_tokens,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    assert all(len(o) == args.output_len for o in outs)
    return len(prompts) * args.output_len / elapsed


def _hf_model(args):
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()


def _hf_generate(model, batch: list[list[int]], args) -> None:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.output_len,
            min_new_tokens=args.output_len,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == width + args.output_len


def run_hf_one(args, model, prompts) -> float:
    _hf_generate(model, prompts[:1], argparse.Namespace(**{**vars(args), "output_len": 4}))
    _sync(args.device)
    t0 = time.perf_counter()
    for p in prompts:
        _hf_generate(model, [p], args)
    _sync(args.device)
    return len(prompts) * args.output_len / (time.perf_counter() - t0)


def run_hf_static(args, model, prompts) -> float:
    _sync(args.device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.static_batch):
        _hf_generate(model, prompts[i : i + args.static_batch], args)
    _sync(args.device)
    return len(prompts) * args.output_len / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = loadavg()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    prompts = make_workload(
        cfg["vocab_size"],
        args.num_prompts,
        args.min_input,
        args.max_input,
        args.seed,
        cfg.get("bos_token_id"),
    )
    results: dict[str, list[float]] = {"tandem": [], "hf_static": [], "hf_one": []}
    model = None if args.skip_hf else _hf_model(args)
    for _ in range(args.repeats):
        results["tandem"].append(run_tandem(args, prompts))
        if model is not None:
            results["hf_static"].append(run_hf_static(args, model, prompts))
            # an evenly spaced subset, so its lengths follow the whole workload's
            step = max(1, len(prompts) // args.hf_one_prompts)
            results["hf_one"].append(run_hf_one(args, model, prompts[::step][: args.hf_one_prompts]))
    med = {k: statistics.median(v) for k, v in results.items() if v}
    report = {
        "command": "python -m tools.bench " + shlex.join(sys.argv[1:]),
        "machine": machine_info(args.device),
        "torch_threads": torch.get_num_threads(),
        "load_average": [load_before, loadavg()],
        "device": args.device,
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": [args.min_input, args.max_input],
            "output_len": args.output_len,
        },
        "output_tokens_per_s": med,
        "runs": results,
    }
    if "hf_one" in med:
        report["ratio_vs_hf_one"] = med["tandem"] / med["hf_one"]
        report["ratio_vs_hf_static"] = med["tandem"] / med["hf_static"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    lines = [
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']['label']}, {report['torch_threads']} torch thread(s), "
        f"load average {report['load_average'][0]} before / {report['load_average'][1]} after. Model {args.model}; {args.num_prompts} prompts, "
        f"input {args.min_input}-{args.max_input} tokens, {args.output_len} output tokens each (ignore_eos); "
        f"median of {args.repeats} runs.",
        "",
        "| system | output tok/s | tandem / system |",
        "|---|---|---|",
        *(f"| {name} | {value:.1f} | {med['tandem'] / value:.2f}x |" for name, value in med.items()),
    ]
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0
