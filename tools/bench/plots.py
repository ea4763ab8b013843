"""PNG plots of one serving-benchmark run (matplotlib, Agg backend: no display needed).

- latency_throughput.png: TTFT, TPOT and E2E latency against achieved output throughput, one
  curve per swept system (the rate sweep plus its saturation point); the HF baselines, which
  take no arrival rate, are single points at their saturation throughput.
- throughput.png: saturation output throughput of every system, per workload.
- prefix_ttft.png: TTFT on the shared-prefix workload, prefix caching on and off.
Every title names the machine and the number of runs each point is the median of.
"""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("median_ttft_ms", "TTFT p50 (ms)"),
    ("p99_ttft_ms", "TTFT p99 (ms)"),
    ("median_tpot_ms", "TPOT p50 (ms)"),
    ("p99_e2el_ms", "E2E latency p99 (ms)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(result: dict) -> str:
    return f"{result['machine']['label']} — median of {result['settings']['repeats']} runs"


def _curves(result: dict) -> dict[str, list[dict]]:
    curves = {}
    for name, entry in result["systems"].items():
        points = [p["median"] for p in entry.get("sweep") or []]
        saturation = ((entry.get("results") or {}).get("mixed") or {}).get("median")
        if saturation and (points or entry.get("kind") == "baseline"):
            points.append(saturation)
        if points:
            curves[name] = sorted(points, key=lambda m: m["output_throughput"])
    return curves


def latency_throughput(result: dict, path: Path) -> bool:
    curves = _curves(result)
    if not curves:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        positive = True
        for name, points in curves.items():
            xs = [m["output_throughput"] for m in points]
            ys = [m[key] for m in points]
            positive &= all(y is not None and y > 0 for y in ys)
            style = "o-" if len(points) > 1 else "s"
            ax.plot(xs, ys, style, label=name)
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(label)
        if positive:  # latencies span orders of magnitude between the baselines and Tandem
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"Latency vs throughput, mixed workload (Poisson sweep + saturation)\n{_subtitle(result)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(result: dict, path: Path, scenarios: tuple[str, ...], key: str, ylabel: str, title: str) -> bool:
    names = [
        n
        for n, e in result["systems"].items()
        if any(((e.get("results") or {}).get(s) or {}).get("median") for s in scenarios)
    ]
    if not names:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) * len(scenarios)), 4.5))
    width = 0.8 / len(scenarios)
    for i, scenario in enumerate(scenarios):
        values = [
            (((result["systems"][n].get("results") or {}).get(scenario) or {}).get("median") or {}).get(key)
            for n in names
        ]
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=scenario)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v is not None else "n/a" for v in values], fontsize="small")
    ax.set_xticks([j + width * (len(scenarios) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.set_title(f"{title}\n{_subtitle(result)}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(result: dict, out_dir: Path) -> list[str]:
    """Write every plot the run has data for; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if latency_throughput(result, out_dir / "latency_throughput.png"):
        written.append(str(out_dir / "latency_throughput.png"))
    if _bars(
        result,
        out_dir / "throughput.png",
        ("mixed", "fixed"),
        "output_throughput",
        "output tokens/s",
        "Saturation output throughput (all requests at once)",
    ):
        written.append(str(out_dir / "throughput.png"))
    if _bars(
        result,
        out_dir / "prefix_ttft.png",
        ("prefix",),
        "median_ttft_ms",
        "TTFT p50 (ms)",
        "Shared-prefix workload: TTFT, prefix caching on and off",
    ):
        written.append(str(out_dir / "prefix_ttft.png"))
    return written
