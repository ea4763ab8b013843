"""The serving benchmark's ratios and its Markdown report, computed from one run's JSON only.

Every ratio is between two figures of the same run (medians over its repeats), so the report
can be regenerated from serve.json and nothing in it is typed by hand.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# throughput ratio goals against each HF baseline, (cpu, gpu), from DESIGN.md
_THROUGHPUT_GOALS = {"hf_one": (10.0, 15.0), "hf_static": (2.0, 2.0)}


def _median(result: dict, system: str, scenario: str, key: str):
    entry = result["systems"].get(system) or {}
    return (((entry.get("results") or {}).get(scenario) or {}).get("median") or {}).get(key)


def _ran(result: dict, system: str) -> bool:
    entry = result["systems"].get(system)
    return bool(entry) and not entry.get("skipped")


def _ratio(num, den):
    if num is None or den is None or den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


def _row(name, num_ref, den_ref, num, den, goal=None, note="", invert=False) -> dict:
    value = _ratio(den, num) if invert else _ratio(num, den)
    return {
        "name": name,
        "value": value,
        "goal": goal,
        "met": None if goal is None or value is None else value >= goal,
        "numerator": num_ref,
        "denominator": den_ref,
        "note": note,
    }


def ratios(result: dict) -> list[dict]:
    """The figures to beat (DESIGN.md), from this run's medians. A ratio with a goal is always listed
    (value None when a side did not run); one without a goal only when both sides ran."""
    gpu = str(result["machine"].get("device", "cpu")).startswith("cuda")
    rows = []
    tandem = [s for s in ("agg", "disagg") if _ran(result, s)]
    for scenario in ("mixed", "fixed"):
        for system in [*tandem, "engine"]:
            for base, goals in _THROUGHPUT_GOALS.items():
                num = _median(result, system, scenario, "output_throughput")
                den = _median(result, base, scenario, "output_throughput")
                if num is None and den is None:
                    continue
                goal = goals[1 if gpu else 0] if scenario == "mixed" and system in tandem else None
                rows.append(
                    _row(
                        f"output throughput {system} / {base}, {scenario}",
                        f"{system}.{scenario}.output_throughput",
                        f"{base}.{scenario}.output_throughput",
                        num,
                        den,
                        goal,
                    )
                )
    for system in tandem:
        num = _median(result, system, "mixed", "output_throughput")
        den = _median(result, "engine", "mixed", "output_throughput")
        rows.append(
            _row(
                f"output throughput {system} (gRPC stack) / in-process engine, mixed",
                f"{system}.mixed.output_throughput",
                "engine.mixed.output_throughput",
                num,
                den,
                0.85 if system == "agg" else None,
            )
        )
    for system in ("agg", "disagg"):  # the two front doors of the same services, interleaved run by run
        if _ran(result, system) and _ran(result, f"{system}-http"):
            for scenario in ("mixed", "fixed"):
                for label, key, goal in (
                    ("output throughput", "output_throughput", 0.9 if scenario == "mixed" else None),
                    ("scheduler CPU per generated token", "scheduler_cpu_ms_per_token", None),
                ):
                    rows.append(
                        _row(
                            f"{label} {system}: HTTP front / gRPC front, {scenario}",
                            f"{system}-http.{scenario}.{key}",
                            f"{system}.{scenario}.{key}",
                            _median(result, f"{system}-http", scenario, key),
                            _median(result, system, scenario, key),
                            goal,
                        )
                    )
    if set(tandem) == {"agg", "disagg"}:
        for scenario in ("mixed", "fixed"):
            num = _median(result, "disagg", scenario, "output_throughput")
            den = _median(result, "agg", scenario, "output_throughput")
            rows.append(
                _row(
                    f"output throughput disagg / agg, {scenario}",
                    f"disagg.{scenario}.output_throughput",
                    f"agg.{scenario}.output_throughput",
                    num,
                    den,
                )
            )
    for system in ("agg", "disagg"):
        off = f"{system}-nocache"
        if _ran(result, system) or _ran(result, off):
            for stat in ("median", "mean"):
                rows.append(
                    _row(
                        f"TTFT {stat}, shared prefix: caching off / on ({system})",
                        f"{off}.prefix.{stat}_ttft_ms",
                        f"{system}.prefix.{stat}_ttft_ms",
                        _median(result, off, "prefix", f"{stat}_ttft_ms"),
                        _median(result, system, "prefix", f"{stat}_ttft_ms"),
                        5.0 if stat == "median" else None,
                    )
                )
    for spec, entry in result["systems"].items():
        base, _, kind = spec.rpartition("-")
        if kind not in ("spec", "ngram"):
            continue
        proposer = "the draft" if kind == "spec" else "n-gram lookup"
        rows.append(
            _row(
                f"TPOT median at concurrency 1: without / with {proposer} ({base})",
                f"{base}.c1.median_tpot_ms",
                f"{spec}.c1.median_tpot_ms",
                _median(result, base, "c1", "median_tpot_ms"),
                _median(result, spec, "c1", "median_tpot_ms"),
                1.3 if kind == "spec" else None,
                note=entry.get("skipped") or "",
            )
        )
    return [r for r in rows if r["value"] is not None or r["goal"] is not None or r["note"]]


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _scenario_title(result: dict, scenario: str) -> str:
    sc = result["scenarios"].get(scenario, {})
    w = result["workloads"].get(scenario) or result["workloads"].get(sc.get("workload"), {})
    rate = sc.get("request_rate")
    burst = sc.get("burstiness", 1.0)
    process = "Poisson" if burst == 1.0 else f"gamma (burstiness {burst:g})"
    arrivals = (
        "all at once"
        if rate == "inf"
        else f"{process} arrivals at " + ("the rates below" if rate is None else f"{rate} req/s")
    )
    cap = f", at most {sc['max_concurrency']} in flight" if sc.get("max_concurrency") else ""
    lens = ""
    if w:
        lens = (
            f"; {w['num_requests']} requests, input mean {w['input_len']['mean']:.0f} (max "
            f"{w['input_len']['max']}), output mean {w['output_len']['mean']:.0f} (max {w['output_len']['max']})"
        )
    return f"{scenario}: {arrivals}{cap}{lens}"


def _system_rows(result: dict, scenario: str) -> list[str]:
    lines = [
        "| system | ok | req/s | out tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms "
        "| E2E p50 / p99 ms | goodput req/s | prefix hit client / service | spec accept | $ / M tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["systems"].items():
        m = ((entry.get("results") or {}).get(scenario) or {}).get("median")
        if not m:
            continue
        lines.append(
            f"| {name} | {m['completed']:.0f}/{m['num_requests']:.0f} | {_fmt(m['request_throughput'], 2)} "
            f"| {_fmt(m['output_throughput'])} "
            f"| {_fmt(m['median_ttft_ms'], 0)} / {_fmt(m['p90_ttft_ms'], 0)} / {_fmt(m['p99_ttft_ms'], 0)} "
            f"| {_fmt(m['median_tpot_ms'])} / {_fmt(m['p99_tpot_ms'])} | {_fmt(m['median_itl_ms'])} / "
            f"{_fmt(m['p99_itl_ms'])} | {_fmt(m['median_e2el_ms'], 0)} / {_fmt(m['p99_e2el_ms'], 0)} "
            f"| {_fmt(m['request_goodput'], 2)} | {_fmt(m['prefix_cache_hit_ratio_client'], 2)} / "
            f"{_fmt(m['prefix_cache_hit_ratio'], 2)} | {_fmt(m['spec_acceptance_rate'], 2)} "
            f"| {_fmt(m['usd_per_million_generated_tokens'], 4)} |"
        )
    return lines


def _load_warning(machine: dict) -> list[str]:
    """A line when the host was busy before the run started (someone else's work on its cores)."""
    load, cores = machine.get("loadavg_1m_before"), machine.get("cores")
    if load is None or not cores or load <= 0.5 * cores:
        return []
    return [
        f"- **the host was busy**: 1-minute load average {load:g} on {cores} cores before the run "
        f"({machine.get('loadavg_1m_after')} after); these figures are contended"
    ]


def markdown(result: dict, md_dir: Path | str | None = None) -> str:
    """The report; plot links are relative to `md_dir` (the directory the Markdown is written to)."""
    s = result["settings"]
    out = [
        "# Tandem serving benchmark",
        "",
        f"- machine: {result['machine']['label']} (torch {result['machine']['torch']}, device "
        f"{result['machine']['device']})",
        f"- model: `{result['model']['path']}`; started {result['started_at']}, {result.get('wall_s', 'n/a')} s",
        f"- every figure is the median of {s['repeats']} runs; ratios come from this run only",
        f"- goodput SLOs: TTFT <= {s['slo_ttft_ms']:g} ms, TPOT <= {s['slo_tpot_ms']:g} ms; "
        f"cost ($ / M tok, from the services' gauges) at ${s.get('gpu_hour_usd', 0):g} per worker-hour "
        "(--gpu-hour-usd)",
        f"- command: `{result['command']}`",
        *_load_warning(result["machine"]),
        "",
        "## Ratios",
        "",
        "| ratio | value | goal | met |",
        "|---|---|---|---|",
    ]
    for r in result["ratios"]:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        note = f" ({r['note']})" if r.get("note") else ""
        goal = f">= {r['goal']:g}x" if r["goal"] is not None else ""
        out.append(
            f"| {r['name']}{note} | {_fmt(r['value'], 2)}{'x' if r['value'] is not None else ''} "
            f"| {goal} | {met} |"
        )
    out += ["", "## Systems", ""]
    for name, entry in result["systems"].items():
        state = f" — **skipped**: {entry['skipped']}" if entry.get("skipped") else ""
        threads = (
            f" ({entry['threads_per_worker']} torch threads per process)"
            if entry.get("threads_per_worker")
            else ""
        )
        out.append(f"- `{name}`: {entry.get('description', '')}{threads}{state}")
    for scenario in result["scenarios"]:
        rows = _system_rows(result, scenario)
        if len(rows) > 2:
            out += ["", f"## {_scenario_title(result, scenario)}", "", *rows]
    sweeps = [(n, e["sweep"]) for n, e in result["systems"].items() if e.get("sweep")]
    if sweeps:
        out += [
            "",
            f"## {_scenario_title(result, 'sweep')}",
            "",
            "| system | rate req/s | achieved req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
            "| E2E p50 / p99 ms | goodput req/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, points in sweeps:
            for p in points:
                m = p["median"]
                out.append(
                    f"| {name} | {_fmt(p['request_rate'], 2)} | {_fmt(m['request_throughput'], 2)} "
                    f"| {_fmt(m['output_throughput'])} | {_fmt(m['median_ttft_ms'], 0)} / {_fmt(m['p99_ttft_ms'], 0)} "
                    f"| {_fmt(m['median_tpot_ms'])} / {_fmt(m['p99_tpot_ms'])} | {_fmt(m['median_e2el_ms'], 0)} / "
                    f"{_fmt(m['p99_e2el_ms'], 0)} | {_fmt(m['request_goodput'], 2)} |"
                )
    notes = list(result.get("notes", []))
    missing = _missing_service_figures(result)
    if missing:
        notes.append("not exposed by the services in this run (null in serve.json): " + ", ".join(missing))
    failures = [
        f"{n}.{sc}: {', '.join(r['median'].get('errors') or [])}"
        for n, e in result["systems"].items()
        for sc, r in (e.get("results") or {}).items()
        if r["median"].get("failed")
    ]
    notes += [f"failed requests in {f}" for f in failures]
    if notes:
        out += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    if result.get("plots"):
        out += ["", "## Plots", ""]
        for p in result["plots"]:
            link = (
                Path(p).name if md_dir is None else os.path.relpath(Path(p).resolve(), Path(md_dir).resolve())
            )
            out.append(f"![{Path(p).stem}]({Path(link).as_posix()})")
    return "\n".join(out) + "\n"


def _missing_service_figures(result: dict) -> list[str]:
    keys = ("prefix_cache_hit_ratio", "spec_acceptance_rate", "usd_per_million_generated_tokens")
    seen = {k: False for k in keys}
    any_tandem = False
    for entry in result["systems"].values():
        if entry.get("kind") != "tandem" or entry.get("skipped"):
            continue
        any_tandem = True
        for r in (entry.get("results") or {}).values():
            for k in keys:
                seen[k] |= r["median"].get(k) is not None
    return [k for k, v in seen.items() if not v] if any_tandem else []
