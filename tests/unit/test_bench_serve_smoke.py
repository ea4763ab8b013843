"""`python -m tools.bench serve` end to end on a tiny random checkpoint: real service processes,
a few requests per scenario, every baseline; the JSON must carry every field the report promises.

Not a measurement: the figures of so short a run mean nothing, only their presence is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.models import make_tiny_checkpoint
from tools.bench.metrics import metric_keys
from tools.bench.scrape import SERVICE_FIGURE_KEYS

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = {
    "schema",
    "command",
    "started_at",
    "wall_s",
    "machine",
    "model",
    "settings",
    "engine",
    "workloads",
    "scenarios",
    "systems",
    "notes",
    "ratios",
    "plots",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = make_tiny_checkpoint(tmp / "target")
    out = tmp / "out"
    cmd = [
        sys.executable, "-m", "tools.bench", "serve", "--model", str(model), "--out-dir", str(out),
        "--configs", "agg,disagg,agg-spec", "--api", "both", "--repeats", "1", "--threads", "1",
        "--num-requests", "3", "--num-prefix-requests", "3", "--hf-one-requests", "2", "--static-batch", "2",
        "--sweep-requests", "2", "--sweep-rates", "1.0", "--sweep-configs", "agg",
        "--fixed-input", "24", "--fixed-output", "4", "--mixed-input-median", "16",
        "--mixed-output-median", "4", "--prefix-len", "64", "--prefix-output", "3",
        "--max-num-seqs", "8", "--max-batched-tokens", "128", "--num-blocks", "128", "--time-limit", "60",
        "--markdown", str(tmp / "docs" / "benchmarks.md"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "serve.json").read_text()), out, proc


def test_json_has_every_field(run):
    result, _, _ = run
    assert TOP_LEVEL <= set(result)
    assert result["machine"]["label"] and result["machine"]["cores"] >= 1
    assert {"loadavg_1m_before", "loadavg_1m_after", "cpu", "torch", "device"} <= set(result["machine"])
    assert result["command"].startswith("python -m tools.bench serve ")
    tandem = {"agg", "disagg", "agg-spec"}
    assert set(result["systems"]) == tandem | {f"{t}-http" for t in tandem} | {
        "engine",
        "hf_static",
        "hf_one",
    }
    expected = set(metric_keys()) | set(SERVICE_FIGURE_KEYS) | {"errors"}
    for name, entry in result["systems"].items():
        if entry["skipped"]:
            continue
        scenarios = {"fixed", "mixed"} if name.startswith("hf_") else {"fixed", "mixed", "prefix"}
        assert set(entry["results"]) == scenarios, name
        for scenario, res in entry["results"].items():
            assert len(res["runs"]) == 1
            missing = expected - set(res["median"])
            assert not missing, f"{name}.{scenario} lacks {missing}"
            assert res["median"]["completed"] == res["median"]["num_requests"], (
                name,
                scenario,
                res["median"],
            )


def test_tandem_answered_through_grpc_and_the_sweep_ran(run):
    result, _, _ = run
    for name in ("agg", "disagg"):
        mixed = result["systems"][name]["results"]["mixed"]["median"]
        assert mixed["output_throughput"] > 0 and mixed["median_ttft_ms"] > 0
        assert result["systems"][name]["threads_per_worker"] == 1
    sweep = result["systems"]["agg"]["sweep"]
    assert len(sweep) == 1 and sweep[0]["median"]["completed"] == 2
    # the shared prefix is served from the cache after the first request
    assert result["systems"]["agg"]["results"]["prefix"]["median"]["prefix_cache_hit_ratio_client"] > 0.3


def test_the_http_front_answered_the_same_workloads_and_its_ratio_is_reported(run):
    result, _, _ = run
    rows = {r["name"]: r for r in result["ratios"]}
    for name in ("agg", "disagg"):
        http, grpc = result["systems"][f"{name}-http"], result["systems"][name]
        assert http["api"] == "http" and grpc["api"] == "grpc"
        for scenario in ("fixed", "mixed", "prefix"):
            h, g = http["results"][scenario]["median"], grpc["results"][scenario]["median"]
            assert h["completed"] == g["completed"] == g["num_requests"]
            assert h["total_output_tokens"] == g["total_output_tokens"]  # the same work through either door
            assert h["median_ttft_ms"] > 0
        row = rows[f"output throughput {name}: HTTP front / gRPC front, mixed"]
        assert row["value"] > 0 and row["goal"] == 0.9


def test_speculation_slot_is_skipped_with_a_note(run):
    result, _, _ = run
    spec = result["systems"]["agg-spec"]
    assert spec["skipped"] and "speculation skipped" in spec["skipped"]
    assert any(n.startswith("agg-spec:") for n in result["notes"])
    row = next(r for r in result["ratios"] if "with the draft (agg)" in r["name"])
    assert row["value"] is None and row["note"] == spec["skipped"]


def test_ratios_markdown_and_plots(run):
    result, out, proc = run
    rows = {r["name"]: r for r in result["ratios"]}
    for name in (
        "output throughput agg / hf_one, mixed",
        "output throughput agg / hf_static, mixed",
        "output throughput agg (gRPC stack) / in-process engine, mixed",
    ):
        assert rows[name]["value"] is not None and rows[name]["value"] > 0, name
    assert rows["TTFT median, shared prefix: caching off / on (agg)"]["value"] is None  # agg-nocache not run
    md = (out / "serve.md").read_text()
    assert md.strip() in proc.stdout  # printed as written
    assert "![latency_throughput](latency_throughput.png)" in md
    docs = (out.parent / "docs" / "benchmarks.md").read_text()
    assert "![latency_throughput](../out/latency_throughput.png)" in docs
    assert docs.replace("../out/", "") == md
    assert "| ratio | value | goal | met |" in md
    for plot in result["plots"]:
        assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert {Path(p).name for p in result["plots"]} >= {"latency_throughput.png", "throughput.png"}
