"""Ratios, Markdown and plots of the serving benchmark, from a synthetic run with known figures."""

from __future__ import annotations

from tools.bench import plots, report
from tools.bench.metrics import metric_keys
from tools.bench.scrape import SERVICE_FIGURE_KEYS


def figures(**values) -> dict:
    m = dict.fromkeys(metric_keys(), 0.0) | dict.fromkeys(SERVICE_FIGURE_KEYS)
    m.update(num_requests=8, completed=8, failed=0, errors=[])
    m.update(values)
    return m


def entry(kind: str = "tandem", skipped=None, sweep=(), **scenarios) -> dict:
    return {
        "kind": kind,
        "description": kind,
        "skipped": skipped,
        "results": {s: {"median": m, "runs": [m]} for s, m in scenarios.items()},
        "sweep": [{"request_rate": r, "median": m, "runs": [m]} for r, m in sweep],
    }


def result(systems: dict, device: str = "cpu") -> dict:
    r = {
        "machine": {"label": "test box, 2 cores", "torch": "x", "device": device},
        "model": {"path": "m"},
        "started_at": "now",
        "command": "python -m tools.bench serve --quick",
        "settings": {"repeats": 3, "slo_ttft_ms": 2000.0, "slo_tpot_ms": 200.0, "gpu_hour_usd": 2.5},
        "workloads": {},
        "scenarios": {"mixed": {"workload": "mixed", "request_rate": "inf", "max_concurrency": None}},
        "systems": systems,
        "notes": [],
    }
    r["ratios"] = report.ratios(r)
    return r


def by_name(res: dict) -> dict:
    return {row["name"]: row for row in res["ratios"]}


RUN = {
    "agg": entry(
        mixed=figures(output_throughput=1200.0, request_throughput=10.0, median_ttft_ms=50.0),
        prefix=figures(median_ttft_ms=20.0, mean_ttft_ms=25.0),
        sweep=[(2.0, figures(output_throughput=240.0, median_ttft_ms=30.0, request_throughput=2.0))],
    ),
    "agg-nocache": entry(prefix=figures(median_ttft_ms=150.0, mean_ttft_ms=150.0)),
    "agg-spec": entry(skipped="speculation skipped: no draft service"),
    "engine": entry("baseline", mixed=figures(output_throughput=1500.0)),
    "hf_one": entry("baseline", mixed=figures(output_throughput=100.0)),
    "hf_static": entry("baseline", mixed=figures(output_throughput=400.0)),
}


def test_ratios_from_the_same_run_with_goals():
    rows = by_name(result(RUN))
    one = rows["output throughput agg / hf_one, mixed"]
    assert one["value"] == 12.0 and one["goal"] == 10.0 and one["met"] is True
    static = rows["output throughput agg / hf_static, mixed"]
    assert static["value"] == 3.0 and static["met"] is True
    stack = rows["output throughput agg (gRPC stack) / in-process engine, mixed"]
    assert stack["value"] == 0.8 and stack["goal"] == 0.85 and stack["met"] is False
    ttft = rows["TTFT median, shared prefix: caching off / on (agg)"]
    assert ttft["value"] == 7.5 and ttft["met"] is True
    assert ttft["numerator"] == "agg-nocache.prefix.median_ttft_ms"
    spec = rows["TPOT median at concurrency 1: without / with the draft (agg)"]
    assert spec["value"] is None and spec["met"] is None and "no draft service" in spec["note"]
    assert rows["output throughput engine / hf_one, mixed"]["goal"] is None  # goals are Tandem's


def test_gpu_goal_is_higher():
    rows = by_name(result(RUN, device="cuda"))
    assert rows["output throughput agg / hf_one, mixed"]["goal"] == 15.0
    assert rows["output throughput agg / hf_one, mixed"]["met"] is False


def test_missing_side_gives_null_ratio():
    rows = by_name(result({"agg": entry(mixed=figures(output_throughput=5.0))}))
    assert rows["output throughput agg / hf_one, mixed"]["value"] is None
    assert rows["output throughput agg / hf_one, mixed"]["met"] is None


def test_markdown_names_machine_command_and_skips():
    md = report.markdown(result(RUN))
    assert "test box, 2 cores" in md
    assert "median of 3 runs" in md
    assert "at $2.5 per worker-hour" in md
    assert "`python -m tools.bench serve --quick`" in md
    assert "| output throughput agg / hf_one, mixed | 12.00x | >= 10x | yes |" in md
    assert "**no**" in md  # the stack/engine goal is missed and says so
    assert "speculation skipped: no draft service" in md
    assert "| agg | 8/8 |" in md
    assert "not exposed by the services" in md  # every service figure is null here


def test_a_busy_host_is_flagged():
    quiet, busy = result(RUN), result(RUN)
    quiet["machine"].update(cores=2, loadavg_1m_before=0.3, loadavg_1m_after=2.1)
    busy["machine"].update(cores=2, loadavg_1m_before=6.5, loadavg_1m_after=8.0)
    assert "busy" not in report.markdown(quiet)
    assert "**the host was busy**: 1-minute load average 6.5 on 2 cores" in report.markdown(busy)


def test_plots_are_written_and_linked_relative_to_the_markdown(tmp_path):
    res = result(RUN)
    written = plots.write_all(res, tmp_path / "out")
    res["plots"] = written
    assert "![throughput](throughput.png)" in report.markdown(res, tmp_path / "out")
    assert "![throughput](out/throughput.png)" in report.markdown(res, tmp_path)
    assert {p.rsplit("/", 1)[1] for p in written} == {
        "latency_throughput.png",
        "throughput.png",
        "prefix_ttft.png",
    }
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
