"""`make run`: the Tandem services as local processes on CPU (scheduler, prefill, decode, draft).

    python -m tools.run_local [--model models/tandem-demo-code/target] [--transport grpc|collective]
                              [--no-prefill] [--port 50051] [--spec draft|draft-in-worker|ngram|none]
                              [--dtype float32] [--max-model-len N] [--kv-cache-memory 2GiB]
                              [--quantization int8] [--kv-cache-dtype fp8|int8]
                              [--metrics-port 9461] [--http-port 8000]

Ports (the services' defaults and the compose files' too): scheduler --port (50051), prefill
+1, decode +2, draft +3; metrics (Prometheus /metrics) on --metrics-port and the next three,
in the same order; the OpenAI-compatible HTTP API on --http-port (8000). Everything binds to
127.0.0.1.

The draft service runs when the model has a draft beside it (the demo pair's layout,
<dir>/target and <dir>/draft; or --draft-model), and the decode worker speculates with it;
`--spec draft-in-worker` runs that draft model inside the decode worker instead.

Starts each service with `python -m services.<name>`, waits until every one reports SERVING
on the gRPC health service, prints how to call it, and runs until Ctrl-C / SIGTERM, which it
passes on to the services as SIGTERM (they stop gracefully; they run in their own process group,
so a terminal's Ctrl-C reaches only this process). A clean stop exits with 0. Service logs are
prefixed with their name.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import hub

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/tandem-demo-code/target"
# offsets from the scheduler's port (and from the first metrics port): the services' defaults
PORT_OFFSETS = {"scheduler": 0, "prefill": 1, "decode": 2, "draft": 3}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512M", "2G", "2GiB", "1.5GB" (binary units)."""
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB or 512M, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value * _SIZE_UNITS[unit])


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
        # its own process group: a terminal's Ctrl-C reaches only run_local, which stops the
        # services in order (SIGTERM), instead of every service at once
        start_new_session=True,
    )
    threading.Thread(target=_pump, args=(name, proc.stdout), daemon=True).start()
    return proc


def wait_healthy(
    procs: dict[str, subprocess.Popen],
    addrs: dict[str, str],
    timeout_s: float,
    stop: threading.Event | None = None,
) -> None:
    """Until every service answers SERVING; raises if one exits or the time runs out. Returns
    early when `stop` is set."""
    deadline = time.monotonic() + timeout_s
    pending = dict(addrs)
    while pending and not (stop is not None and stop.is_set()):
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
            if stop is not None:
                stop.wait(0.25)
            else:
                time.sleep(0.25)


def wait_routable(scheduler: str, num_workers: int, timeout_s: float, stop: threading.Event) -> None:
    """Until the scheduler sees its workers healthy (it checks them every health interval)."""
    from shared.pb.tandem.v1 import generate_pb2, generate_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(scheduler) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        while not stop.is_set():
            try:
                info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5.0)
                if sum(w.healthy for w in info.workers) >= num_workers:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler sees no healthy workers after {timeout_s:.0f}s")
            stop.wait(0.2)


def stop_all(procs: dict[str, subprocess.Popen], grace_s: float) -> int:
    """SIGTERM to the scheduler, then (once it stopped) to the workers: they keep serving the
    requests it is finishing, and it does not see them go away. SIGKILL after the grace period."""
    first = {n: p for n, p in procs.items() if n == "scheduler"}
    rest = {n: p for n, p in procs.items() if n != "scheduler"}
    worst = 0
    for group in (first, rest):
        for proc in group.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 10
        for name, proc in group.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time: killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
            worst = worst or proc.returncode
    return worst


def build_parser(prog: str = "python -m tools.run_local") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="model directory, or a Hugging Face repo id in the local cache (default %(default)s)",
    )
    parser.add_argument(
        "--port", type=int, default=50051, help="scheduler port; prefill, decode, draft use the next three"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9461,
        help="Prometheus /metrics port of the scheduler; prefill, decode, draft use the next three "
        "(default %(default)s; 0: no metrics servers)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="the scheduler's OpenAI-compatible HTTP API (default %(default)s; 0: off)",
    )
    parser.add_argument("--transport", choices=("grpc", "collective"), default="grpc", help="KV transport")
    parser.add_argument(
        "--no-prefill", action="store_true", help="aggregated mode: the decode worker prefills"
    )
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per worker"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight and KV element type of the workers (TANDEM_DTYPE; default float32)",
    )
    parser.add_argument(
        "--quantization",
        choices=("none", "int8"),
        default=None,
        help="int8: weight-only int8 for every linear layer, quantized at load (TANDEM_QUANTIZATION)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8", "int8"),
        default=None,
        help="8-bit KV cache, ~1.94x the tokens of bfloat16 per byte (TANDEM_KV_CACHE_DTYPE; default auto)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest sequence in tokens (TANDEM_MAX_MODEL_LEN; default: the model's, or what the KV "
        "cache holds for one sequence if that is less)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=None,
        help="KV cache per worker, e.g. 2GiB or 512M (TANDEM_KV_CACHE_MEMORY; default 1GiB)",
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks per worker (default: engine's)"
    )
    parser.add_argument(
        "--draft-model", default=None,
        help="draft model directory or cached repo id (default: <model>/../draft, if there)",
    )
    parser.add_argument(
        "--spec",
        choices=("draft", "draft-in-worker", "ngram", "none"),
        default=None,
        help="speculative decoding: the draft service, the draft model inside the decode worker (no draft "
        "service, no call per step), n-gram lookup, or none (default: draft if there is one)",
    )
    parser.add_argument(
        "--trace-file",
        default=os.environ.get("TANDEM_TRACE_FILE"),
        help="append every service's spans to this JSON-lines file, for `python -m tools.traces` "
        "(default: $TANDEM_TRACE_FILE; none)",
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    return parser


def command(*args: str) -> str:
    """How to run a Tandem command from any shell, in any directory: the `tandem` console script
    when installed next to this Python, else this Python with -m (absolute paths either way)."""
    bindir = Path(os.path.abspath(sys.executable)).parent
    script = bindir / "tandem"
    shown = str(script if script.is_file() else bindir / Path(sys.executable).name)
    mod = {"generate": "tools.client", "traces": "tools.traces", "bench": "tools.bench"}
    if script.is_file():
        return " ".join([shown, *args])
    return " ".join([shown, "-m", mod.get(args[0], args[0]), *args[1:]])


def main(argv: list[str] | None = None, prog: str = "python -m tools.run_local") -> int:
    args = build_parser(prog).parse_args(argv)

    model = Path(args.model)
    if not model.is_absolute() and not model.exists() and (ROOT / model).exists():
        model = ROOT / model  # the bundled demo model, when started from another directory
    try:  # a Hugging Face repo id: its snapshot in the local cache
        found, repo_id = hub.resolve(str(model))
        draft_found, draft_repo_id = hub.resolve(args.draft_model or "")
    except hub.ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = Path(found)
    if not (model / "config.json").is_file():
        print(
            f"error: no model at {model} (config.json missing).\n"
            f"Build the demo model with `make demo-model`, or pass --model DIR.",
            file=sys.stderr,
        )
        return 2

    draft_model = Path(draft_found) if args.draft_model else model.resolve().parent / "draft"
    spec = args.spec or ("draft" if (draft_model / "config.json").is_file() else "none")
    if spec in ("draft", "draft-in-worker") and not (draft_model / "config.json").is_file():
        print(f"error: no draft model at {draft_model} (config.json missing).", file=sys.stderr)
        return 2
    if spec in ("draft", "draft-in-worker"):
        from shared.text import tokenizer_mismatch

        why = tokenizer_mismatch(model, draft_model)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2

    ports = {name: args.port + offset for name, offset in PORT_OFFSETS.items()}
    host = "127.0.0.1"
    addrs = {name: f"{host}:{port}" for name, port in ports.items()}
    common = {"TANDEM_MODEL": str(model.resolve()), "TANDEM_HOST": host, "TANDEM_LOG_JSON": "0"}
    if repo_id:
        common["TANDEM_MODEL_NAME"] = repo_id  # as vLLM names it, not by the snapshot's commit
    if args.trace_file:
        common["TANDEM_TRACE_FILE"] = str(Path(args.trace_file).resolve())
    worker = {
        **common,
        "TANDEM_DEVICE": "cpu",
        "TANDEM_TORCH_THREADS": str(args.threads),
        "TANDEM_KV_TRANSPORT": args.transport,
    }
    for env, value in (
        ("TANDEM_NUM_BLOCKS", args.num_blocks),
        ("TANDEM_DTYPE", args.dtype),
        ("TANDEM_QUANTIZATION", args.quantization),
        ("TANDEM_KV_CACHE_DTYPE", args.kv_cache_dtype),
        ("TANDEM_MAX_MODEL_LEN", args.max_model_len),
        ("TANDEM_KV_CACHE_MEMORY", args.kv_cache_memory),
    ):
        if value:
            worker[env] = str(value)
    services = {}
    decode = {**worker, "TANDEM_PORT": str(ports["decode"]),
              "TANDEM_SPEC_PROPOSER": "draft" if spec == "draft-in-worker" else spec}
    if spec == "draft-in-worker":
        decode["TANDEM_DRAFT_MODEL"] = str(draft_model.resolve())
    if spec == "draft":
        draft = {**worker, "TANDEM_MODEL": str(draft_model.resolve()), "TANDEM_PORT": str(ports["draft"]),
                 "TANDEM_MODEL_NAME": draft_repo_id or ""}
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
            "TANDEM_HTTP_PORT": str(args.http_port),
            "TANDEM_DECODE_ADDRS": addrs["decode"],
            "TANDEM_PREFILL_ADDRS": "" if args.no_prefill else addrs["prefill"],
        },
    )
    metrics = {}
    if args.metrics_port:
        for name, (_, env) in services.items():
            env["TANDEM_METRICS_PORT"] = str(args.metrics_port + PORT_OFFSETS[name])
            metrics[name] = f"http://{host}:{env['TANDEM_METRICS_PORT']}/metrics"

    stop = threading.Event()
    # Ctrl-C and SIGTERM: stop the services in order and exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, (module, env) in services.items():
            procs[name] = start(name, module, env)
        print(
            f"starting {', '.join(procs)} (the first start compiles the CPU kernels: about a minute)",
            file=sys.stderr,
        )
        wait_healthy(procs, {n: addrs[n] for n in procs}, args.startup_timeout, stop)
        workers = sum(name in procs for name in ("prefill", "decode"))
        wait_routable(addrs["scheduler"], workers, args.startup_timeout, stop)
        if not stop.is_set():
            print(_banner(args, addrs, metrics, spec, chat=has_chat_template(model)), file=sys.stderr)
        while not stop.is_set():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}")
            stop.wait(0.5)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        stop_all(procs, grace_s=5)
        return 1
    except BaseException:  # a bug here must not leave the services running without us
        stop_all(procs, grace_s=5)
        raise
    print("stopping ...", file=sys.stderr)
    code = stop_all(procs, grace_s=5)
    if code:
        print(f"a service exited with code {code} while stopping", file=sys.stderr)
    return code


def has_chat_template(model: Path) -> bool:
    """Whether the scheduler will serve chat completions for this model (chat_template.jinja,
    or a chat_template in tokenizer_config.json: services/scheduler/http/chat.py)."""
    if (model / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def _banner(
    args: argparse.Namespace, addrs: dict[str, str], metrics: dict[str, str], spec: str, *, chat: bool = True
) -> str:
    lines = [
        "",
        f"Tandem is up: scheduler {addrs['scheduler']}"
        + ("" if args.no_prefill else f", prefill {addrs['prefill']} ({args.transport} KV transport)")
        + f", decode {addrs['decode']}"
        + {
            "draft": f", draft {addrs['draft']}",
            "draft-in-worker": " (its draft model inside it)",
            "ngram": ", n-gram speculation",
            "none": "",
        }[spec],
    ]
    if metrics:
        order = sorted(metrics, key=PORT_OFFSETS.__getitem__)
        lines.append("metrics: " + ", ".join(f"{name} {metrics[name]}" for name in order))
    prompt = '"def fib(n):"'
    body = '{"text": "def fib(n):", "sampling": {"temperature": 0}, "stopping": {"maxTokens": 32}}'
    lines += [
        "Try (both greedy):",
        "  " + command("generate", "--addr", addrs["scheduler"], prompt, "--max-tokens", "64"),
        f"  grpcurl -plaintext -d '{body}' {addrs['scheduler']} tandem.v1.Tandem/Generate",
    ]
    if args.http_port:
        base = f"http://127.0.0.1:{args.http_port}/v1"
        http_body = '{"prompt": "def fib(n):", "max_tokens": 32, "temperature": 0}'
        lines += [
            f"OpenAI-compatible API at {base} (any api_key):",
            f"  curl {base}/completions -H 'Content-Type: application/json' -d '{http_body}'",
        ]
        # this Python has the openai package (a dev dependency); a model without a chat
        # template serves completions only
        sdk = f"c = OpenAI(base_url='{base}', api_key='none'); model = c.models.list().data[0].id; "
        if chat:
            sdk += (
                "print(c.chat.completions.create(model=model, max_tokens=32, "
                "messages=[{'role': 'user', 'content': 'fibonacci numbers'}]).choices[0].message.content)"
            )
        else:
            sdk += "print(c.completions.create(model=model, max_tokens=32, prompt='def fib(n):').choices[0].text)"
        python = Path(os.path.abspath(sys.executable))
        lines.append(f'  {python} -c "from openai import OpenAI; {sdk}"')
    if args.trace_file:
        trace_file = os.path.abspath(args.trace_file)
        lines.append("  " + command("traces", "show", "<request id>", "--file", trace_file))
    lines.append(
        "WARNING: plaintext and no API keys: local development only (TLS and keys: docs/security.md)."
    )
    lines.append("Ctrl-C stops everything.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
