"""The command-line tools a user runs: the `tandem` console script, the client's Ctrl-C, and
`tools.traces` finding a request by an id prefix in $TANDEM_TRACE_FILE."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from shared.pb.tandem.v1 import generate_pb2, generate_pb2_grpc
from tools import cli, run_local, traces

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_is_declared_and_dispatches(capsys):
    assert '[project.scripts]\ntandem = "tools.cli:main"\n' in (ROOT / "pyproject.toml").read_text()
    assert set(cli.COMMANDS) >= {"serve", "generate", "bench"}
    assert cli.main(["--help"]) == 0
    assert "tandem serve" in capsys.readouterr().out
    for command in ("serve", "generate", "bench", "traces"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0
        assert f"usage: tandem {command}" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2


class SlowTandem(generate_pb2_grpc.TandemServicer):
    """Streams a token every 50 ms, for as long as the client listens."""

    def Generate(self, request, context):
        for i in range(10_000):
            if not context.is_active():
                return
            yield generate_pb2.GenerateResponse(request_id="slow", text=f"t{i} ", token_ids=[i % 100])
            time.sleep(0.05)


def test_client_ctrl_c_prints_no_traceback():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generate_pb2_grpc.add_TandemServicer_to_server(SlowTandem(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        # Ctrl-C as at a terminal: a suite started as a background job (`make test &`) runs with
        # SIGINT ignored, which its children inherit, and Python keeps an ignored SIGINT ignored
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.client", "--addr", f"127.0.0.1:{port}", "hello"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert proc.stdout.read(3) == b"t0 "  # streaming
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert b"Traceback" not in err and b"interrupted" in err, err
    finally:
        server.stop(0)


def _span(trace_id: str, span_id: str, request_id: str) -> dict:
    return {
        "trace_id": trace_id, "span_id": span_id, "parent_span_id": None, "name": "generate",
        "kind": "SERVER", "service": "tandem-scheduler", "start_time_unix_nano": 1_000_000,
        "end_time_unix_nano": 3_000_000, "attributes": {"tandem.request_id": request_id}, "status": {},
    }


def test_traces_show_takes_a_request_id_prefix_and_the_trace_file_variable(tmp_path, monkeypatch, capsys):
    path = tmp_path / "spans.jsonl"
    spans = [
        _span("a" * 32, "1" * 16, "81a8587df522463482481260e6a58664"),
        _span("b" * 32, "2" * 16, "9f00aa"),
    ]
    path.write_text("".join(json.dumps(s) + "\n" for s in spans))
    monkeypatch.setenv("TANDEM_TRACE_FILE", str(path))
    assert traces.main(["show", "81a8587d"]) == 0  # a request id prefix, file from the variable
    out = capsys.readouterr().out
    assert "request 81a8587df522463482481260e6a58664" in out and "9f00aa" not in out
    assert traces.main(["show", "9f00aa"]) == 0  # a full request id still works
    assert "request 9f00aa" in capsys.readouterr().out
    monkeypatch.delenv("TANDEM_TRACE_FILE")
    with pytest.raises(SystemExit):
        traces.main(["show", "9f00aa"])  # no --file and no TANDEM_TRACE_FILE: a usage error
    assert "TANDEM_TRACE_FILE" in capsys.readouterr().err


@pytest.mark.parametrize("chat", [True, False])
def test_make_run_examples_run_from_any_directory(tmp_path, monkeypatch, chat):
    monkeypatch.chdir(tmp_path)
    args = run_local.build_parser("tandem serve").parse_args(["--trace-file", "spans.jsonl"])
    addrs = {name: f"127.0.0.1:{50051 + off}" for name, off in run_local.PORT_OFFSETS.items()}
    banner = run_local._banner(args, addrs, {}, "none", chat=chat)
    lines = banner.splitlines()
    generate = next(line.split() for line in lines if " generate " in line or "tools.client" in line)
    sdk = next(line.strip() for line in lines if "from openai import OpenAI" in line)
    show = next(line.split() for line in lines if " show " in line)
    # absolute paths of this environment (it has the openai package), not `python` or `.venv/...`
    assert Path(generate[0]).is_absolute() and Path(generate[0]).is_file()
    python, code = sdk.split(" -c ", 1)
    assert Path(python).is_absolute() and Path(python).parent == Path(sys.executable).parent
    assert Path(show[show.index("--file") + 1]) == tmp_path / "spans.jsonl"
    source = code.strip('"')
    compile(source, "<banner>", "exec")
    assert ("chat.completions.create" in source) == chat
    assert ("c.completions.create" in source) == (not chat)


def test_has_chat_template(tmp_path):
    assert not run_local.has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert not run_local.has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert run_local.has_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert run_local.has_chat_template(tmp_path)


@pytest.mark.parametrize("spec, services", [
    ("draft", ["draft", "decode", "prefill", "scheduler"]),
    ("draft-in-worker", ["decode", "prefill", "scheduler"]),
])
def test_serve_runs_the_draft_as_a_service_or_inside_the_decode_worker(monkeypatch, spec, services, capsys):
    started: dict[str, dict[str, str]] = {}
    monkeypatch.setattr(run_local, "start", lambda name, module, env: started.setdefault(name, env))

    def planned(*_):
        raise RuntimeError("planned only")

    monkeypatch.setattr(run_local, "wait_healthy", planned)
    monkeypatch.setattr(run_local, "stop_all", lambda procs, grace_s: 0)
    assert run_local.main(["--model", str(ROOT / "models/tandem-demo-code/target"), "--spec", spec]) == 1
    assert list(started) == services
    decode = started["decode"]
    assert decode["TANDEM_SPEC_PROPOSER"] == "draft"
    draft_dir = str((ROOT / "models/tandem-demo-code/draft").resolve())
    if spec == "draft":
        assert "TANDEM_DRAFT_MODEL" not in decode and started["draft"]["TANDEM_MODEL"] == draft_dir
    else:
        assert decode["TANDEM_DRAFT_MODEL"] == draft_dir and "TANDEM_DRAFT_ADDR" not in decode


def test_the_banner_names_every_speculation_choice():
    parser = run_local.build_parser("tandem serve")
    choices = next(a.choices for a in parser._actions if a.dest == "spec")
    args = parser.parse_args([])
    addrs = {name: f"127.0.0.1:{50051 + off}" for name, off in run_local.PORT_OFFSETS.items()}
    for spec in choices:
        assert "Tandem is up" in run_local._banner(args, addrs, {}, spec)
    assert "draft model inside it" in run_local._banner(args, addrs, {}, "draft-in-worker")


def test_an_unexpected_error_still_stops_the_started_services(monkeypatch):
    started: dict[str, object] = {}
    stopped: list[dict] = []
    monkeypatch.setattr(run_local, "start", lambda name, module, env: started.setdefault(name, object()))
    monkeypatch.setattr(run_local, "wait_healthy", lambda *a: (_ for _ in ()).throw(KeyError("a bug")))
    monkeypatch.setattr(run_local, "stop_all", lambda procs, grace_s: stopped.append(dict(procs)) or 0)
    with pytest.raises(KeyError):
        run_local.main(["--model", str(ROOT / "models/tandem-demo-code/target"), "--spec", "none"])
    assert stopped == [started] and set(started) == {"decode", "prefill", "scheduler"}
