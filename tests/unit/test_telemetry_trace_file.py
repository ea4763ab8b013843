"""TANDEM_TRACE_FILE: spans as JSON lines, and `python -m tools.traces` reading them back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc

from shared.telemetry import TelemetryConfig, setup_telemetry
from tools import traces

ROOT = Path(__file__).resolve().parents[2]


def _run_request(telemetry, request_id: str, fail_transfer: bool = False) -> None:
    """A scheduler-shaped trace: generate > route, decode > prefill > kv transfer."""
    with telemetry.span("generate", request_id=request_id, prompt_tokens=12):
        with telemetry.span("route", decode_worker="decode-0", prefill_worker="prefill-0"):
            time.sleep(0.002)
        with telemetry.span("decode", completion_tokens=3, finish_reason="length"):
            with telemetry.span("prefill", prompt_tokens=12, cached_tokens=8):
                try:
                    with telemetry.span("kv_transfer", kv_bytes=4096, kv_blocks=2, kv_transport="grpc") as s:
                        s.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                        if fail_transfer:
                            raise ConnectionError("peer gone")
                except ConnectionError:
                    pass


def _write_trace_file(path: Path) -> None:
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="scheduler", trace_file=str(path)),
        set_global=False,
        configure_logs=False,
    )
    _run_request(telemetry, "req-a")
    _run_request(telemetry, "req-b", fail_transfer=True)
    telemetry.shutdown()


def test_trace_file_holds_one_json_object_per_span(tmp_path):
    path = tmp_path / "spans.jsonl"
    _write_trace_file(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 10
    kv = next(r for r in records if r["name"] == "kv_transfer")
    assert re.fullmatch(r"[0-9a-f]{32}", kv["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", kv["span_id"])
    assert kv["service"] == "scheduler"
    assert kv["attributes"]["tandem.kv_bytes"] == 4096
    assert kv["duration_ms"] >= 0
    prefill = next(r for r in records if r["name"] == "prefill" and r["trace_id"] == kv["trace_id"])
    assert kv["parent_span_id"] == prefill["span_id"]
    roots = [r for r in records if r["parent_span_id"] is None]
    assert sorted(r["attributes"]["tandem.request_id"] for r in roots) == ["req-a", "req-b"]


def test_show_prints_the_request_tree_with_durations_and_attributes(tmp_path, capsys):
    path = tmp_path / "spans.jsonl"
    _write_trace_file(path)

    assert traces.main(["show", "req-b", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("trace ") and "request req-b" in lines[0] and "5 spans" in lines[0]
    body = lines[2:]
    names = [line.split()[2] for line in body]
    assert names == ["generate", "route", "decode", "prefill", "kv_transfer"]
    indents = {line.split()[0]: len(line) - len(line.lstrip()) for line in (b[23:] for b in body)}
    assert indents == {"generate": 0, "route": 2, "decode": 2, "prefill": 4, "kv_transfer": 6}
    route = body[1]
    assert float(route.split()[1]) >= 2.0  # it slept 2 ms
    assert "decode_worker=decode-0" in route and "prefill_worker=prefill-0" in route
    kv_line = body[4]
    assert "kv_bytes=4096" in kv_line and "kv_transport=grpc" in kv_line and "grpc=OK" in kv_line
    assert "ERROR(ConnectionError: peer gone)" in kv_line
    assert "cached_tokens=8" in body[3]
    assert "req-a" not in out

    # The same trace by its id, and by a prefix of it.
    trace_id = lines[0].split()[1]
    assert traces.main(["show", trace_id, "--file", str(path)]) == 0
    assert capsys.readouterr().out == out
    assert traces.main(["show", trace_id[:8], "--file", str(path)]) == 0
    assert capsys.readouterr().out == out


def test_show_as_a_command_and_unknown_ids(tmp_path):
    path = tmp_path / "spans.jsonl"
    _write_trace_file(path)
    cmd = [sys.executable, "-m", "tools.traces"]
    shown = subprocess.run(
        [*cmd, "show", "req-a", "--file", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "request req-a" in shown.stdout and "kv_transfer" in shown.stdout

    listed = subprocess.run([*cmd, "list", "--file", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0
    assert [line.split()[-1] for line in listed.stdout.splitlines()] == ["req-a", "req-b"]

    missing = subprocess.run(
        [*cmd, "show", "req-zzz", "--file", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert "no trace or request 'req-zzz'" in missing.stderr


def test_spans_from_several_files_join_into_one_tree(tmp_path, capsys):
    """Each service may write its own file; a cross-service parent still nests its children."""
    a_path, b_path = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = setup_telemetry(
        TelemetryConfig(service_name="scheduler", trace_file=str(a_path)),
        set_global=False,
        configure_logs=False,
    )
    b = setup_telemetry(
        TelemetryConfig(service_name="decode", trace_file=str(b_path)), set_global=False, configure_logs=False
    )
    with a.span("generate", request_id="req-x"), b.span("decode_step"):
        pass
    a.shutdown()
    b.shutdown()
    assert traces.main(["show", "req-x", "--file", str(a_path), "--file", str(b_path)]) == 0
    body = capsys.readouterr().out.splitlines()[2:]
    assert "generate [scheduler]" in body[0]
    assert "  decode_step [decode]" in body[1]
