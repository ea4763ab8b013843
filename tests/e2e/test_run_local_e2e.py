"""`make run` (tools/run_local.py) as a user runs it: the port layout, metrics on the gRPC host,
the model flags reaching the workers, and Ctrl-C ending with exit code 0."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from shared.config import DEFAULT_PORTS
from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tools import run_local

from .procs import ROOT, free_port

pytestmark = pytest.mark.slow


def test_port_layout_is_the_services_defaults():
    base = DEFAULT_PORTS["scheduler"]
    assert {name: base + off for name, off in run_local.PORT_OFFSETS.items()} == DEFAULT_PORTS


def test_parse_size():
    assert run_local.parse_size("1073741824") == 1 << 30
    assert run_local.parse_size("2GiB") == run_local.parse_size("2G") == 2 << 30
    assert run_local.parse_size("512M") == 512 << 20
    with pytest.raises(Exception, match="size"):
        run_local.parse_size("lots")


def test_make_run_serves_and_ctrl_c_exits_cleanly(tiny_model, tmp_path):
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.run_local",
            "--model",
            str(tiny_model),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--http-port",
            str(http_port),
            "--threads",
            "1",
            "--max-model-len",
            "96",
            "--kv-cache-memory",
            "4M",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # like a terminal: Ctrl-C goes to the whole foreground group
    )
    lines: list[str] = []
    up = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not up.is_set():
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        out = "".join(lines)
        for name, offset in run_local.PORT_OFFSETS.items():
            if name != "draft":
                assert f"{name} 127.0.0.1:{port + offset}" in out
                url = f"http://127.0.0.1:{metrics_port + offset}/metrics"
                assert url in out
                assert b"tandem_" in urllib.request.urlopen(url, timeout=5).read()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generate_pb2_grpc.TandemStub(channel)
            assert stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=10).max_model_len == 96
            resps = list(
                stub.Generate(
                    generate_pb2.GenerateRequest(
                        token_ids=common_pb2.TokenIds(ids=[1, 5, 6, 7]),
                        sampling=common_pb2.SamplingParameters(temperature=0.0),
                        stopping=common_pb2.StoppingCriteria(max_tokens=4, ignore_eos=True),
                    ),
                    timeout=60,
                )
            )
            assert resps[-1].usage.completion_tokens == 4
        # the printed curl works as printed
        curl = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))
        assert f"http://127.0.0.1:{http_port}/v1/completions" in curl
        answer = json.loads(
            subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60).stdout
        )
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] > 0
        # so do the printed client and openai SDK lines, from another directory (a model without
        # a chat template gets the completions example)
        for markers in ((" generate ", "-m tools.client "), ("from openai import OpenAI",)):
            line = next(
                line.strip()
                for line in out.splitlines()
                if line.startswith("  /") and any(m in line for m in markers)  # the banner's, not a log's
            )
            done = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        assert proc.wait(60) == 0, "".join(lines)
        reader.join(10)
        out = "".join(lines)
        assert "error" not in out.lower() and "Traceback" not in out, out
        assert "is unhealthy" not in out, out  # the scheduler stops before its workers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
