"""`python -m tools.bench serve`: Tandem's services under load, with the baselines in the same run.

    python -m tools.bench serve --model models/tandem-demo-code/target            # full run
    python -m tools.bench serve --model models/tandem-demo-code/target --quick    # smaller preset

Each Tandem configuration (aggregated, disaggregated, prefix caching off, speculation) runs as
real processes on free loopback ports, driven over the public Generate RPC, or with --api http
over the OpenAI-compatible HTTP API (POST /v1/completions, streamed), or with --api both over
each in turn, run by run, on the same services (systems <config> and <config>-http; the report
gives the HTTP front's throughput as a ratio of the gRPC front's); the baselines (HF
transformers `generate` one request at a time and in static batches, Tandem's engine in this
process) run the same workloads on the same model in the same run. Scenarios:

    fixed, mixed  all requests at once (saturation), or --request-rate/--burstiness/--max-concurrency
    prefix        one shared system prompt, at --prefix-concurrency (default 1: TTFT without queueing);
                  the -nocache configurations run only this one (their TTFT is the ratio's baseline)
    c1            held-out Python source at concurrency 1: TPOT with and without speculation (run only
                  when a speculation configuration can run, by it and by its plain twin)
    sweep         the mixed workload at Poisson rates up to saturation: latency-throughput curves

Every figure is the median over --repeats runs. Output in --out-dir: serve.json (every run),
serve.md (tables and ratios; also printed) and PNG plots; --markdown PATH writes the same report
there too (docs/benchmarks.md), its plot links relative to it. Metric definitions (vLLM's):
tools/bench/metrics.py; figures scraped from the services: tools/bench/scrape.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

from . import plots, report
from .loadgen import EngineBackend, GrpcBackend, HttpBackend
from .machine import cores, loadavg, machine_info, model_shape
from .runner import Runner
from .topology import CONFIGURATIONS, EngineSettings, Services, unavailable_reason
from .workloads import describe

BASELINES = ("engine", "hf_static", "hf_one")
DEFAULTS = dict(
    num_requests=64,
    num_prefix_requests=16,
    hf_one_requests=8,
    sweep_requests=32,
    repeats=3,
    sweep_rates="auto",
    configs="agg,disagg,agg-nocache,disagg-nocache,agg-spec",
    sweep_configs="agg,disagg,engine",
)
QUICK = dict(
    num_requests=24,
    num_prefix_requests=8,
    hf_one_requests=4,
    sweep_requests=16,
    repeats=2,
    sweep_rates="0.25,0.5,1.0",
    configs="agg,disagg,agg-nocache,disagg-nocache,agg-spec",
    sweep_configs="agg,engine",
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serving benchmark over the Generate RPC, baselines in the same run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="models/tandem-demo-code/target")
    p.add_argument("--quick", action="store_true", help=f"smaller preset (defaults {QUICK})")
    p.add_argument("--configs", help=f"of {', '.join(CONFIGURATIONS)} (default {DEFAULTS['configs']})")
    p.add_argument(
        "--baselines", default=",".join(BASELINES), help="of engine, hf_static, hf_one ('' for none)"
    )
    p.add_argument(
        "--api",
        choices=("grpc", "http", "both"),
        default="grpc",
        help="how the load reaches Tandem's services: the Generate RPC, the OpenAI-compatible HTTP API "
        "(system <config>-http), or both, interleaved run by run on the same services (default grpc)",
    )
    p.add_argument("--workloads", default="fixed,mixed,prefix")
    p.add_argument("--num-requests", type=int, help="requests of the fixed and mixed runs (default 64)")
    p.add_argument("--num-prefix-requests", type=int, help="default 16")
    p.add_argument("--hf-one-requests", type=int, help="hf_one runs the first N requests (default 8)")
    p.add_argument("--static-batch", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=math.inf, help="fixed/mixed arrivals, req/s (inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, < 1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--prefix-concurrency", type=int, default=1)
    p.add_argument("--c1-requests", type=int, default=8)
    p.add_argument(
        "--sweep-rates",
        help="'auto' (0.2,...,1.0 x the first swept system's saturation rate on "
        "mixed), fractions '0.5,1.0', absolute 'abs:1,2,4' req/s, or 'none'",
    )
    p.add_argument("--sweep-configs", help=f"systems swept (default {DEFAULTS['sweep_configs']})")
    p.add_argument("--sweep-requests", type=int, help="default 32")
    p.add_argument("--repeats", type=int, help="runs per figure; the median is reported (default 3)")
    p.add_argument(
        "--interleave-configs",
        action="store_true",
        help="start every configuration's services at once and take turns between them on each repeat, "
        "same prompts for all (fairer ratios on a host whose speed drifts; no sweep)",
    )
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per measured run")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput: TTFT SLO")
    p.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput: TPOT SLO")
    for name, default in (
        ("fixed-input", 256),
        ("fixed-output", 128),
        ("prefix-len", 768),
        ("prefix-output", 32),
        ("code-input", 128),
        ("code-output", 128),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--mixed-input-median", type=float, default=128)
    p.add_argument("--mixed-output-median", type=float, default=64)
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: all cores with one "
        "worker, half each with two; the baselines use all)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--gpu-hour-usd", type=float, default=0.0, help="price given to the services' cost gauge")
    p.add_argument("--machine", help="label of this machine in the report (default: CPU model, cores, GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench-results/serve")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--markdown", help="also write the report here (e.g. docs/benchmarks.md), links relative to it"
    )
    p.set_defaults(func=run, subparser=p)


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def sweep_rates(args, systems: dict, own: dict) -> list[float]:
    """Rates of the sweep; fractions refer to the first swept system's saturation rate (or this one's)."""
    text = (args.sweep_rates or "none").strip()
    if text in ("none", ""):
        return []
    if text.startswith("abs:"):
        return [float(x) for x in _csv(text[4:])]
    fractions = [0.2, 0.4, 0.6, 0.8, 1.0] if text == "auto" else [float(x) for x in _csv(text)]
    done = [systems[s] for s in _csv(args.sweep_configs) if "mixed" in systems.get(s, {}).get("results", {})]
    ref = (done[0] if done else own)["results"].get("mixed")
    if ref is None:
        return []
    saturation = ref["median"]["request_throughput"]
    return [round(f * saturation, 4) for f in fractions if f * saturation > 0]


def command_line(args) -> str:
    """The command that repeats this run: the flags that differ from their defaults."""
    defaults = vars(args.subparser.parse_args([]))
    words = ["python", "-m", "tools.bench", "serve"]
    for key, value in vars(args).items():
        if key in ("func", "subparser") or key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _finite(obj):
    """JSON has no NaN or Infinity: such floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run(args) -> int:
    command = command_line(args)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    model = Path(args.model)
    error = _check_args(args, model)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads or cores())
    shape = model_shape(model)
    engine = EngineSettings(
        dtype=args.dtype,
        device=args.device,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
    )
    runner = Runner(args, shape)
    load_before = loadavg()
    t0, started = time.monotonic(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    systems: dict[str, dict] = {}
    notes: list[str] = []
    scenarios = [w for w in _csv(args.workloads) if w in ("fixed", "mixed", "prefix")]
    configs = [CONFIGURATIONS[c] for c in _csv(args.configs)]
    speculating = [c for c in configs if c.speculation and unavailable_reason(c, str(model)) is None]

    def rates_for(name: str):
        swept = name in _csv(args.sweep_configs) and "mixed" in scenarios
        return lambda own: sweep_rates(args, systems, own) if swept else []

    def scenarios_of(config) -> list[str]:
        # c1 compares TPOT with and without speculation: the speculating configurations and their twins
        mine = scenarios + (["c1"] if speculating and config.prefix_caching else [])
        if not config.prefix_caching and "prefix" in mine:
            mine = ["prefix"]  # a -nocache twin is there for the prefix-caching TTFT ratio only
        return mine

    if args.interleave_configs and len({tuple(scenarios_of(c)) for c in configs}) > 1:
        print("--interleave-configs: the configurations must run the same workloads "
              "(no -nocache twin beside the others)", file=sys.stderr)
        return 2
    if args.interleave_configs:
        ran = run_tandem_interleaved(args, runner, model, configs, engine, scenarios_of(configs[0]))
    else:
        ran = {}
        for config in configs:
            ran.update(run_tandem(args, runner, model, config, engine, scenarios_of(config), rates_for(config.name)))
    systems.update(ran)
    for name, entry in ran.items():
        if entry["skipped"]:
            notes.append(f"{name}: {entry['skipped']}")
    systems.update(run_baselines(args, runner, model, engine, scenarios, rates_for))

    result = {
        "schema": "tandem.bench.serve/1",
        "command": command,
        "started_at": started,
        "machine": machine_info(args.device, args.machine)
        | {"loadavg_1m_before": load_before, "loadavg_1m_after": loadavg()},
        "model": {
            "path": str(model),
            "vocab_size": shape.vocab_size,
            "max_model_len": shape.max_model_len,
            "draft": str(Path(model).parent / "draft") if speculating else None,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "subparser")}
        | {"request_rate": _rate_label(args.request_rate)},
        "engine": dataclasses.asdict(engine),
        "workloads": {k: describe(v) for k, v in runner.workloads.items()},
        "scenarios": {
            k: {**v, "request_rate": _rate_label(v["request_rate"])} for k, v in runner.scenarios.items()
        },
        "systems": systems,
        "notes": notes,
    }
    result["ratios"] = report.ratios(result)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    write_outputs(args, result)
    return 0


def tandem_entry(config, model: Path, http: bool = False) -> dict:
    """A configuration's result entry before it runs (skipped: why it cannot run here)."""
    return {
        "kind": "tandem",
        "api": "http" if http else "grpc",
        "description": config.describe() + (", OpenAI-compatible HTTP API" if http else ""),
        "skipped": unavailable_reason(config, str(model)),
    }


def threads_per_worker(args, config) -> int:
    """--threads, or the host's cores shared by the configuration's workers."""
    return args.threads or max(1, cores() // (2 if config.disaggregated else 1))


def run_tandem(args, runner: Runner, model: Path, config, engine, scenarios, sweep_rates) -> dict:
    """One configuration: start its services, run every scenario through the public API(s) that
    --api names (gRPC as <config>, HTTP as <config>-http, interleaved), stop them."""
    names = {
        "grpc": [config.name],
        "http": [f"{config.name}-http"],
        "both": [config.name, f"{config.name}-http"],
    }[args.api]
    entries = {name: tandem_entry(config, model, http=name.endswith("-http")) for name in names}
    if entries[names[0]]["skipped"]:
        return entries
    threads = threads_per_worker(args, config)
    try:
        with Services(str(model), config, engine, threads=threads, gpu_hour_usd=args.gpu_hour_usd) as svc:
            backends = {
                name: (
                    (lambda url=svc.http_url: HttpBackend(url), True)
                    if name.endswith("-http")
                    else (lambda addr=svc.address: GrpcBackend(addr), True)
                )
                for name in names
            }
            outs = runner.run_systems(backends, scenarios, sweep_rates, svc.metrics_urls)
            for name in names:
                entries[name]["threads_per_worker"] = threads
                entries[name].update(outs[name])
    except RuntimeError as e:
        for entry in entries.values():
            entry["skipped"] = f"failed to run: {e}"
    return entries


def run_tandem_interleaved(args, runner: Runner, model: Path, configs, engine, scenarios) -> dict:
    """Every configuration's services up at once (gRPC front), each repeat of each scenario run on
    every stack in turn with the same prompts, so that the host's drift over minutes falls on
    all of them alike (--interleave-configs; the stacks that are not measuring sit idle)."""
    entries = {c.name: tandem_entry(c, model) for c in configs}
    running = [c for c in configs if not entries[c.name]["skipped"]]
    try:
        with contextlib.ExitStack() as stack:
            stacks = {}
            for c in running:
                threads = entries[c.name]["threads_per_worker"] = threads_per_worker(args, c)
                stacks[c.name] = stack.enter_context(
                    Services(str(model), c, engine, threads=threads, gpu_hour_usd=args.gpu_hour_usd)
                )
            backends = {name: (lambda addr=svc.address: GrpcBackend(addr), True) for name, svc in stacks.items()}
            outs = runner.run_systems(backends, scenarios, lambda own: [],
                                      own_services={name: svc.metrics_urls for name, svc in stacks.items()})
            for name, out in outs.items():
                entries[name].update(out)
    except RuntimeError as e:
        for c in running:
            entries[c.name]["skipped"] = f"failed to run: {e}"
    return entries


def run_baselines(args, runner: Runner, model: Path, engine, scenarios, rates_for) -> dict:
    """The in-process engine and the HF baselines that --baselines names, in this process."""
    import torch

    wanted, systems = _csv(args.baselines), {}
    threads = torch.get_num_threads()
    if "engine" in wanted:
        eb = EngineBackend(engine.engine_config(str(model), prefix_caching=True))
        systems["engine"] = {
            "kind": "baseline",
            "skipped": None,
            "threads_per_worker": threads,
            "description": "Tandem's engine in this process (AsyncEngine, no gRPC), prefix caching on",
        }
        try:
            systems["engine"].update(
                runner.run_system("engine", scenarios, (lambda: eb, False), rates_for("engine"))
            )
        finally:
            eb.engine.shutdown()
    hf = [b for b in ("hf_static", "hf_one") if b in wanted]
    if hf:
        from .baselines import load_hf_model

        hf_model = load_hf_model(str(model), args.dtype, args.device)
        for name in hf:
            desc = (
                f"HF transformers generate, one request at a time (first {args.hf_one_requests} requests)"
                if name == "hf_one"
                else f"HF transformers generate, static batches of {args.static_batch}"
            )
            systems[name] = {
                "kind": "baseline",
                "description": desc,
                "skipped": None,
                "threads_per_worker": threads,
            }
            systems[name].update(runner.run_hf(name, hf_model, scenarios))
    return systems


def write_outputs(args, result: dict) -> None:
    """serve.json, serve.md (printed too), the plots, and --markdown if given."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = [] if args.no_plots else plots.write_all(result, out_dir)
    result.update(_finite(result))
    (out_dir / "serve.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    markdown = report.markdown(result, out_dir)
    (out_dir / "serve.md").write_text(markdown)
    if args.markdown:  # e.g. docs/benchmarks.md: the same report, plot links relative to it
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report.markdown(result, Path(args.markdown).parent))
    print(markdown)
    print(
        f"wrote {out_dir / 'serve.json'}, {out_dir / 'serve.md'}"
        + "".join(f", {p}" for p in result["plots"]),
        file=sys.stderr,
    )


def _check_args(args, model: Path) -> str | None:
    if not (model / "config.json").is_file():
        return (
            f"no model at {model} (config.json missing); `make demo-model` builds the demo one, "
            "or pass --model DIR"
        )
    unknown = [c for c in _csv(args.configs) if c not in CONFIGURATIONS]
    if unknown:
        return f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGURATIONS)}"
    unknown = [b for b in _csv(args.baselines) if b not in BASELINES]
    if unknown:
        return f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}"
    return None


def _rate_label(rate):
    return "inf" if rate is not None and math.isinf(rate) else rate
