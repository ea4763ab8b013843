"""`python -m tools.bench spec` (`make bench-spec`): speculative decoding, measured against its
baseline and against Leviathan et al.'s formula, in one run.

    python -m tools.bench spec --model models/tandem-demo-code/target

Runs the serving benchmark (tools/bench/serve.py) on six configurations of the same stack:
`agg` (no speculation), `agg-spec` (the default: the draft service, called on its stream
transport, k chosen per step by the engine's policy, shared/engine/spec_policy.py),
`agg-spec-fixed` (the draft service, always k), `agg-spec-ahead` (the draft service drafting
ahead while the target verifies, TANDEM_DRAFT_AHEAD=1, adaptive k), `agg-spec-grpc` (the
default called over gRPC, TANDEM_DRAFT_TRANSPORT=grpc) and `agg-spec-local` (the same draft model inside the
decode worker, TANDEM_DRAFT_MODEL, adaptive k), each at concurrency 1 (the c1 workload: held-out
Python source) and at saturation (the mixed workload, all requests at once). The stacks run side
by side and take turns on each repeat, with the same prompts (serve's --interleave-configs): on a
host whose speed drifts over minutes, running one configuration after another puts the drift
into the ratios. Then, in this process, with one
torch thread as the services run, before the serving runs and after them (averaged):
the cost of a batch-1 decode step of the draft and of the target, whose ratio is c. The
per-token acceptance rate a is solved from the fixed-k run's accepted / proposed drafts
(for i.i.d. acceptance, E[accepted per step] = a (1 - a^k) / (1 - a)). Leviathan et al.'s
predicted speedup is E(k) / (1 + k c), E(k) = (1 - a^(k+1)) / (1 - a), at the configured k and
at the best k <= it. The formula assumes the draft runs before the target, step by step; a
draft that drafts ahead runs beside it, and can beat it.

Prints and writes (--out-dir) spec.md and spec.json: TPOT and output throughput with and
without speculation at concurrency 1 and at saturation, the ratios, a, c and the prediction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from shared.engine.spec_policy import expected_tokens, leviathan_speedup

from .topology import draft_model_dir

CONFIGS = ("agg", "agg-spec", "agg-spec-fixed", "agg-spec-ahead", "agg-spec-grpc", "agg-spec-local")
SPECULATING = ("agg-spec", "agg-spec-fixed", "agg-spec-ahead", "agg-spec-grpc", "agg-spec-local")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "spec",
        help="speculative decoding: with / without, c1 and saturation, against Leviathan et al.'s formula",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="models/tandem-demo-code/target")
    p.add_argument("--k", type=int, default=4, help="TANDEM_NUM_SPECULATIVE_TOKENS (the most per step)")
    p.add_argument("--c1-requests", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=24, help="requests of the saturation run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--step-samples", type=int, default=64, help="decode steps timed for c")
    p.add_argument("--out-dir", default="bench-results/spec")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from . import serve

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    serve_args = parser.parse_args(
        [
            "serve",
            "--model", args.model,
            "--quick",
            "--configs", ",".join(CONFIGS),
            "--workloads", "mixed",
            "--baselines", "",
            "--sweep-rates", "none",
            "--threads", str(args.threads),
            "--num-requests", str(args.num_requests),
            "--c1-requests", str(args.c1_requests),
            "--repeats", str(args.repeats),
            "--interleave-configs",
            "--out-dir", str(out_dir / "serve"),
            "--no-plots",
        ]
    )  # fmt: skip
    os.environ["TANDEM_NUM_SPECULATIVE_TOKENS"] = str(args.k)  # inherited by the decode worker
    started = time.monotonic()
    before = step_costs(args.model, args.step_samples)
    if serve.run(serve_args) != 0:
        return 1
    result = json.loads((out_dir / "serve" / "serve.json").read_text())
    costs = mean_costs(before, step_costs(args.model, args.step_samples))
    summary = summarize(result, costs, args.k)
    summary["command"] = " ".join(["python -m tools.bench spec", *sys.argv[2:]])
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (out_dir / "spec.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    (out_dir / "spec.md").write_text(text)
    print(text)
    return 0


def _median(result: dict, system: str, scenario: str, key: str):
    entry = result["systems"].get(system) or {}
    return ((entry.get("results") or {}).get(scenario) or {}).get("median", {}).get(key)


def solve_acceptance(accepted_per_proposed: float, k: int) -> float:
    """a such that a (1 - a^k) / (1 - a) / k = accepted / proposed (i.i.d. acceptance, k fixed)."""
    target = accepted_per_proposed * k
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, k) - 1.0 < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def summarize(result: dict, costs: dict, k: int) -> dict:
    get = lambda system, scenario, key: _median(result, system, scenario, key)  # noqa: E731
    rows = {}
    for system in CONFIGS:
        rows[system] = {
            "c1_tpot_ms": get(system, "c1", "median_tpot_ms"),
            "c1_mean_tpot_ms": get(system, "c1", "mean_tpot_ms"),
            "c1_throughput": get(system, "c1", "output_throughput"),
            "sat_tpot_ms": get(system, "mixed", "median_tpot_ms"),
            "sat_throughput": get(system, "mixed", "output_throughput"),
            "c1_acceptance": get(system, "c1", "spec_acceptance_rate"),
            "c1_draft_s_per_proposed": get(system, "c1", "spec_draft_s_per_proposed"),
            "sat_acceptance": get(system, "mixed", "spec_acceptance_rate"),
            # the drafts per sequence the policy chose, over the steps that could speculate
            "c1_mean_k": get(system, "c1", "spec_mean_k"),
            "sat_mean_k": get(system, "mixed", "spec_mean_k"),
            # the draft calls a c1 step took without waiting (drafted ahead)
            "c1_foreseen": get(system, "c1", "spec_foreseen_share"),
        }
    ratio = lambda a, b: (a / b) if a and b else None  # noqa: E731
    base = rows["agg"]
    out = {"k": k, "rows": rows, "costs": costs, "machine": result.get("machine"), "ratios": {}}
    for system in SPECULATING:
        r = rows[system]
        out["ratios"][system] = {
            "c1_tpot_speedup": ratio(base["c1_tpot_ms"], r["c1_tpot_ms"]),
            # the mean request's TPOT beside the median one's: the policy's k differs by request
            "c1_mean_tpot_speedup": ratio(base["c1_mean_tpot_ms"], r["c1_mean_tpot_ms"]),
            "c1_throughput": ratio(r["c1_throughput"], base["c1_throughput"]),
            "sat_throughput": ratio(r["sat_throughput"], base["sat_throughput"]),
        }
    rate = rows["agg-spec-fixed"]["c1_acceptance"]
    c = costs["c"]
    if rate is not None and c is not None:
        a = solve_acceptance(rate, k)
        best = max(range(1, k + 1), key=lambda j: leviathan_speedup(a, j, c))
        out["formula"] = {
            "acceptance_per_token": a,
            "accepted_per_proposed": rate,
            "c": c,
            "speedup_at_k": leviathan_speedup(a, k, c),
            "best_k": best,
            "speedup_at_best_k": leviathan_speedup(a, best, c),
        }
        # the same formula with the draft's cost as served: each draft call as the decode worker
        # waited for it (the round trip and the draft service's own overhead included), per
        # proposed token, over the plain served step (the c1 TPOT without speculation)
        per_token = rows["agg-spec-fixed"]["c1_draft_s_per_proposed"]
        if per_token and base["c1_tpot_ms"]:
            c_served = per_token * 1e3 / base["c1_tpot_ms"]
            out["formula"]["c_served"] = c_served
            out["formula"]["speedup_at_k_served"] = leviathan_speedup(a, k, c_served)
    return out


def mean_costs(*measured: dict) -> dict:
    """The step costs measured before and after the serving runs, averaged: this host's speed
    drifts over the minutes between them, and c from one moment moved the prediction by 20%."""
    out: dict = {"measured": list(measured)}
    for key in ("target_step_ms", "draft_step_ms"):
        values = [m[key] for m in measured if m[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    out["c"] = out["draft_step_ms"] / out["target_step_ms"] if out["draft_step_ms"] is not None else None
    return out


def step_costs(model: str, samples: int) -> dict:
    """Median seconds of a batch-1 greedy decode step of the target and of its draft, in this
    process with one torch thread (as the services run), and c = draft / target."""
    import torch

    torch.set_num_threads(1)
    target = _decode_step_s(model, samples)
    draft_dir = draft_model_dir(model)
    draft = _decode_step_s(str(draft_dir), samples) if (draft_dir / "config.json").is_file() else None
    return {"target_step_ms": target * 1e3, "draft_step_ms": None if draft is None else draft * 1e3,
            "c": None if draft is None else draft / target}  # fmt: skip


def _decode_step_s(model: str, samples: int) -> float:
    from shared.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=model, num_blocks=64, max_num_seqs=1, enable_prefix_caching=False))
    vocab = engine.model_config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(128)]
    params = SamplingParams(temperature=0.0, max_tokens=samples + 8, ignore_eos=True)
    engine.add_request("c", prompt, params)
    engine.step()  # the prefill
    for _ in range(4):  # warm
        engine.step()
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fmt(x, digits=2, suffix=""):
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"


def markdown(s: dict) -> str:
    rows, ratios, f = s["rows"], s["ratios"], s.get("formula", {})
    machine = s.get("machine") or {}
    lines = [
        f"Command: `{s['command']}`; machine: {machine.get('label', machine.get('cpu', 'n/a'))}; "
        f"load average (1 min) {machine.get('loadavg_1m_before')} before, {machine.get('loadavg_1m_after')} after.",
        "",
        "| configuration | c1 TPOT ms | c1 tok/s | saturation TPOT ms | saturation tok/s | acceptance c1 / sat "
        "| mean k c1 / sat | drafted ahead, c1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_fmt(r['c1_tpot_ms'], 1)} | {_fmt(r['c1_throughput'], 1)} | {_fmt(r['sat_tpot_ms'], 1)} "
            f"| {_fmt(r['sat_throughput'], 1)} | {_fmt(r['c1_acceptance'])} / {_fmt(r['sat_acceptance'])} "
            f"| {_fmt(r['c1_mean_k'])} / {_fmt(r['sat_mean_k'])} | {_fmt(r.get('c1_foreseen'))} |"
        )
    lines += [
        "",
        "| ratio (with the draft / without) | draft service, adaptive k | draft service, fixed k "
        "| draft service, adaptive k, drafting ahead | draft service over gRPC, adaptive k "
        "| draft in the decode worker, adaptive k | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label, goal in (
        ("c1_tpot_speedup", "TPOT speedup at concurrency 1", ">= 1.3x and >= 0.8 of the formula"),
        ("c1_mean_tpot_speedup", "TPOT speedup at concurrency 1, mean over the requests", ""),
        ("c1_throughput", "output throughput at concurrency 1", ""),
        ("sat_throughput", "output throughput at saturation (mixed)", ">= 0.9x"),
    ):
        cells = " | ".join(_fmt((ratios.get(system) or {}).get(key), 2, "x") for system in SPECULATING)
        lines.append(f"| {label} | {cells} | {goal} |")
    c = s["costs"]
    lines += [
        "",
        f"Leviathan et al.: batch-1 decode step {_fmt(c['target_step_ms'])} ms target, "
        f"{_fmt(c['draft_step_ms'])} ms draft, c = {_fmt(c['c'], 3)}"
        + "".join(f" ({label}: {_fmt(m['target_step_ms'])} / {_fmt(m['draft_step_ms'])} ms)"
                  for label, m in zip(("before the runs", "after"), c.get("measured", []), strict=False))
        + f"; accepted / proposed drafts at "
        f"k = {s['k']} (fixed, c1) {_fmt(f.get('accepted_per_proposed'), 3)}, so a = "
        f"{_fmt(f.get('acceptance_per_token'), 3)} per token; predicted speedup E(k) / (1 + k c) = "
        f"{_fmt(f.get('speedup_at_k'), 2, 'x')} at k = {s['k']}, {_fmt(f.get('speedup_at_best_k'), 2, 'x')} at the "
        f"best k = {f.get('best_k', 'n/a')}. Measured / predicted (adaptive, c1): draft service "
        + _fmt(_of_formula(ratios, "agg-spec", f.get("speedup_at_best_k")), 2)
        + " (drafting ahead "
        + _fmt(_of_formula(ratios, "agg-spec-ahead", f.get("speedup_at_best_k")), 2)
        + ", over gRPC "
        + _fmt(_of_formula(ratios, "agg-spec-grpc", f.get("speedup_at_best_k")), 2)
        + "), draft in the decode worker "
        + _fmt(_of_formula(ratios, "agg-spec-local", f.get("speedup_at_best_k")), 2)
        + f"; wall time {s.get('wall_s')} s.",
    ]
    if f.get("c_served") is not None:
        lines += [
            "",
            f"With the draft's cost as served (each draft call as the decode worker waited for it, per "
            f"proposed token, over the c1 TPOT without speculation): c = {_fmt(f['c_served'], 3)}, predicted "
            f"{_fmt(f['speedup_at_k_served'], 2, 'x')} at k = {s['k']}; measured / predicted (adaptive, c1): "
            + _fmt(_of_formula(ratios, "agg-spec", f["speedup_at_k_served"]), 2) + ".",
        ]
    return "\n".join(lines) + "\n"


def _of_formula(ratios: dict, system: str, predicted: float | None) -> float | None:
    """A configuration's measured c1 TPOT speedup over the predicted one (None: either missing)."""
    measured = (ratios.get(system) or {}).get("c1_tpot_speedup")
    return measured / predicted if measured and predicted else None
