"""`make run`: the Tandem services as local processes on CPU (scheduler, prefill, decode, draft).

    python -m tools.run_local [--model models/tandem-demo-code/target] [--transport grpc|collective]
                              [--no-prefill] [--port 50051] [--spec draft|ngram|none]

The draft service runs when the model has a draft beside it (the demo pair's layout,
<dir>/target and <dir>/draft; or --draft-model), and the decode worker speculates with it.

Starts each service with `python -m services.<name>`, waits until every one reports SERVING
on the gRPC health service, prints how to call it, and runs until Ctrl-C / SIGTERM, which it
passes on to the services (they stop gracefully). Service logs are prefixed with their name.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/tandem-demo-code/target"


def _pump(name: str, stream) -> None:
    for line in iter(stream.readline, ""):
        sys.stderr.write(f"[{name:9}] {line}")
    stream.close()


def start(name: str, module: str, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    threading.Thread(target=_pump, args=(name, proc.stdout), daemon=True).start()
    return proc


def wait_healthy(procs: dict[str, subprocess.Popen], addrs: dict[str, str], timeout_s: float) -> None:
    """Until every service answers SERVING; raises if one exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    pending = dict(addrs)
    while pending:
        for name, addr in list(pending.items()):
            if procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {procs[name].returncode} during start-up")
            try:
                with grpc.insecure_channel(addr) as channel:
                    resp = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0
                    )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    del pending[name]
            except grpc.RpcError:
                pass
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout_s:.0f}s: {', '.join(pending)}")
        if pending:
            time.sleep(0.25)


def stop_all(procs: dict[str, subprocess.Popen], grace_s: float) -> int:
    """SIGTERM to every service (scheduler first), then SIGKILL after the grace period."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 10
    worst = 0
    for name, proc in procs.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in time: killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
        worst = worst or proc.returncode
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.run_local", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory (default %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="scheduler port; workers use the next ones")
    parser.add_argument("--transport", choices=("grpc", "collective"), default="grpc", help="KV transport")
    parser.add_argument(
        "--no-prefill", action="store_true", help="aggregated mode: the decode worker prefills"
    )
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per worker"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks per worker (default: engine's)"
    )
    parser.add_argument(
        "--draft-model", default=None, help="draft model directory (default: <model>/../draft, if there)"
    )
    parser.add_argument(
        "--spec",
        choices=("draft", "ngram", "none"),
        default=None,
        help="speculative decoding: the draft service, n-gram lookup, or none (default: draft if there is one)",
    )
    parser.add_argument(
        "--trace-file",
        default=os.environ.get("TANDEM_TRACE_FILE"),
        help="append every service's spans to this JSON-lines file, for `python -m tools.traces` "
        "(default: $TANDEM_TRACE_FILE; none)",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)

    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(
            f"error: no model at {model} (config.json missing).\n"
            f"Build the demo model with `make demo-model`, or pass --model DIR.",
            file=sys.stderr,
        )
        return 2

    draft_model = Path(args.draft_model) if args.draft_model else model.resolve().parent / "draft"
    spec = args.spec or ("draft" if (draft_model / "config.json").is_file() else "none")
    if spec == "draft" and not (draft_model / "config.json").is_file():
        print(f"error: no draft model at {draft_model} (config.json missing).", file=sys.stderr)
        return 2

    ports = {
        "scheduler": args.port,
        "decode": args.port + 1,
        "prefill": args.port + 2,
        "draft": args.port + 3,
    }
    addrs = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    common = {"TANDEM_MODEL": str(model.resolve()), "TANDEM_HOST": "127.0.0.1", "TANDEM_LOG_JSON": "0"}
    if args.trace_file:
        common["TANDEM_TRACE_FILE"] = str(Path(args.trace_file).resolve())
    worker = {
        **common,
        "TANDEM_DEVICE": "cpu",
        "TANDEM_TORCH_THREADS": str(args.threads),
        "TANDEM_KV_TRANSPORT": args.transport,
    }
    if args.num_blocks:
        worker["TANDEM_NUM_BLOCKS"] = str(args.num_blocks)
    services = {}
    decode = {**worker, "TANDEM_PORT": str(ports["decode"]), "TANDEM_SPEC_PROPOSER": spec}
    if spec == "draft":
        draft = {**worker, "TANDEM_MODEL": str(draft_model.resolve()), "TANDEM_PORT": str(ports["draft"])}
        services["draft"] = ("services.draft", draft)
        decode["TANDEM_DRAFT_ADDR"] = addrs["draft"]
    services["decode"] = ("services.decode", decode)
    if not args.no_prefill:
        services["prefill"] = ("services.prefill", {**worker, "TANDEM_PORT": str(ports["prefill"])})
    services["scheduler"] = (
        "services.scheduler",
        {
            **common,
            "TANDEM_PORT": str(ports["scheduler"]),
            "TANDEM_DECODE_ADDRS": addrs["decode"],
            "TANDEM_PREFILL_ADDRS": "" if args.no_prefill else addrs["prefill"],
        },
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, (module, env) in services.items():
            procs[name] = start(name, module, env)
        wait_healthy(procs, {n: addrs[n] for n in procs}, args.startup_timeout)
        print(
            f"\nTandem is up: scheduler {addrs['scheduler']}, decode {addrs['decode']}"
            + ("" if args.no_prefill else f", prefill {addrs['prefill']} ({args.transport} KV transport)")
            + {"draft": f", draft {addrs['draft']}", "ngram": ", n-gram speculation", "none": ""}[spec]
            + f'\n  python -m tools.client --addr {addrs["scheduler"]} "def fib(n):" --max-tokens 64'
            + f'\n  grpcurl -plaintext -d \'{{"text": "def fib(n):", "stopping": {{"max_tokens": 32}}}}\' '
            f"{addrs['scheduler']} tandem.v1.Tandem/Generate"
            + (
                f"\n  python -m tools.traces show <request id> --file {args.trace_file}   (a request's spans)"
                if args.trace_file
                else ""
            )
            + "\nCtrl-C stops everything.\n",
            file=sys.stderr,
        )
        while not stop.is_set():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}")
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        stop_all(procs, grace_s=5)
        return 1
    return stop_all(procs, grace_s=5)


if __name__ == "__main__":
    sys.exit(main())
