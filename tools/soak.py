"""`make soak`: the full stack under mixed load while workers are killed and restarted.

    python -m tools.soak [--duration 600] [--concurrency 6] [--model models/tandem-demo-code/target]

Starts a scheduler, one prefill worker, two decode workers and the draft service as local
processes on loopback (each `python -m services.<name>`), then for `--duration` seconds:

- `--concurrency` clients send requests drawn from a fixed prompt pool: greedy requests whose
  tokens are checked against a greedy reference computed by HF transformers on the same
  checkpoint, seeded sampled requests, requests the client cancels at a random moment, and
  requests with short deadlines;
- a chaos loop SIGKILLs the prefill worker, a decode worker or the draft service at random
  moments and restarts it on the same port once it is dead.

Then the load stops and every live worker must drain: all KV blocks free, nothing running.
The report counts requests sent / completed / failed with a clean status (UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, or cancelled by the client) / failed otherwise, outputs
checked against the reference (and how many were wrong: every greedy stream, even a cancelled
or migrated one, must be a prefix of the reference), KV blocks leaked and hung requests.
The exit status is 1 when anything is wrong, leaked, hung or failed without a clean status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/tandem-demo-code/target"
CLEAN_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Source the prompts are cut from: stdlib modules (any Python text works; it only has to be
# code-like so that the demo model's outputs are not all one token).
PROMPT_MODULES = ("json.decoder", "textwrap", "string", "bisect", "heapq", "shlex")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A service process that can be killed and started again on the same port."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path):
        self.name, self.module, self.env = name, module, env
        self.port = int(env["TANDEM_PORT"])
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        log = self.log_path.open("a")
        log.write(f"--- start {self.starts + 1} ---\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=ROOT,
            env={**os.environ, "TANDEM_HOST": "127.0.0.1", **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout_s: float = 15.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    async def wait_serving(self, timeout_s: float = 180.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited during start-up; see {self.log_path}")
                with contextlib.suppress(grpc.RpcError):
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not serving after {timeout_s:.0f}s; see {self.log_path}")
                await asyncio.sleep(0.2)


def build_stack(model: Path, draft: Path | None, log_dir: Path, num_blocks: int) -> dict[str, Proc]:
    ports = {name: free_port() for name in ("scheduler", "prefill", "decode-a", "decode-b", "draft")}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    worker = {
        "TANDEM_MODEL": str(model),
        "TANDEM_TORCH_THREADS": "1",
        "TANDEM_NUM_BLOCKS": str(num_blocks),
        "TANDEM_GRACE_PERIOD_S": "1",
        "TANDEM_LOG_JSON": "1",
    }
    procs = {
        "prefill": Proc(
            "prefill", "services.prefill", {**worker, "TANDEM_PORT": str(ports["prefill"])}, log_dir
        )
    }
    decode = dict(worker)
    if draft is not None:
        # A killed decode worker never releases its sequences on the draft: the draft frees them
        # when idle this long, which the drain at the end waits for.
        draft_env = {
            **worker,
            "TANDEM_MODEL": str(draft),
            "TANDEM_PORT": str(ports["draft"]),
            "TANDEM_DRAFT_IDLE_TIMEOUT_S": "5",
        }
        procs["draft"] = Proc("draft", "services.draft", draft_env, log_dir)
        decode |= {"TANDEM_SPEC_PROPOSER": "draft", "TANDEM_DRAFT_ADDR": addr["draft"]}
    for name in ("decode-a", "decode-b"):
        procs[name] = Proc(name, "services.decode", {**decode, "TANDEM_PORT": str(ports[name])}, log_dir)
    procs["scheduler"] = Proc(
        "scheduler",
        "services.scheduler",
        {
            "TANDEM_MODEL": str(model),
            "TANDEM_PORT": str(ports["scheduler"]),
            "TANDEM_HTTP_PORT": "0",  # gRPC only: never in the way of a `make run` on port 8000
            "TANDEM_HEALTH_INTERVAL_S": "0.2",
            "TANDEM_DECODE_ADDRS": f"{addr['decode-a']},{addr['decode-b']}",
            "TANDEM_PREFILL_ADDRS": addr["prefill"],
            "TANDEM_MAX_QUEUED_REQUESTS": "1000",
            "TANDEM_LOG_JSON": "1",
        },
        log_dir,
    )
    return procs


# ---- the greedy reference -------------------------------------------------------------------


def prompt_pool(model: Path, size: int, seed: int) -> list[list[int]]:
    """`size` token-id prompts of 8-300 tokens cut from stdlib source, the same for a seed."""
    import importlib
    import inspect

    from shared.text import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    ids: list[int] = []
    for name in PROMPT_MODULES:
        ids += tokenizer.encode(inspect.getsource(importlib.import_module(name)))
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        n = rng.choice((8, 24, 60, 130, 300))
        start = rng.randrange(0, len(ids) - n)
        pool.append(ids[start : start + n])
    return pool


def greedy_reference(model: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, `max_tokens` long, EOS ignored."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            # eos_token_id=None: the whole length, as the requests' ignore_eos does
            ids = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            out.append(ids[0, len(prompt) :].tolist())
    return out


# ---- load -----------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed_clean: int = 0
    failed_unclean: int = 0
    cancelled_by_client: int = 0
    checked: int = 0
    wrong: int = 0
    hung: int = 0
    tokens: int = 0
    statuses: Counter = field(default_factory=Counter)
    kills: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(what)


async def one_request(stub, rng: random.Random, pool, refs, tally: Tally, hang_s: float) -> None:
    i = rng.randrange(len(pool))
    kind = rng.choices(("greedy", "sampled", "cancel", "deadline"), weights=(60, 15, 15, 10))[0]
    max_tokens = rng.randint(4, len(refs[i]))
    sampling = common_pb2.SamplingParameters(temperature=0.0)
    if kind == "sampled":
        sampling = common_pb2.SamplingParameters(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    req = generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=pool[i]),
        sampling=sampling,
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )
    timeout = rng.uniform(0.2, 3.0) if kind == "deadline" else None
    call = stub.Generate(req, timeout=timeout)
    got: list[int] = []
    finished = False
    tally.sent += 1

    async def consume() -> None:
        nonlocal finished
        async for resp in call:
            got.extend(resp.token_ids)
            if resp.finish_reason:
                finished = True

    task = asyncio.ensure_future(consume())
    try:
        if kind == "cancel":
            done, _ = await asyncio.wait({task}, timeout=rng.uniform(0.0, 2.0))
            if not done:
                call.cancel()
                tally.cancelled_by_client += 1
                tally.statuses["CANCELLED (client)"] += 1
                with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                    await asyncio.wait_for(task, hang_s)
                return check(kind, got, refs[i], tally, complete=False, max_tokens=max_tokens)
        await asyncio.wait_for(asyncio.shield(task), hang_s)
        tally.completed += 1
        tally.tokens += len(got)
        tally.statuses["OK"] += 1
        if not finished or len(got) != max_tokens:
            tally.failed_unclean += 1
            tally.note(f"{kind}: {len(got)} of {max_tokens} tokens, finished={finished}")
        check(kind, got, refs[i], tally, complete=True, max_tokens=max_tokens)
    except asyncio.TimeoutError:
        call.cancel()
        tally.hung += 1
        tally.note(f"{kind}: no end after {hang_s:.0f}s ({len(got)} tokens)")
    except grpc.aio.AioRpcError as e:
        tally.statuses[e.code().name] += 1
        if e.code() in CLEAN_CODES:
            tally.failed_clean += 1
        else:
            tally.failed_unclean += 1
            tally.note(f"{kind}: {e.code().name}: {e.details()}")
        check(kind, got, refs[i], tally, complete=False, max_tokens=max_tokens)


def check(kind: str, got: list[int], ref: list[int], tally: Tally, complete: bool, max_tokens: int) -> None:
    """Greedy streams, whole or cut short, must be a prefix of the reference."""
    if kind == "sampled":
        return
    tally.checked += 1
    if got != ref[: len(got)]:
        tally.wrong += 1
        first = next(j for j, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b) if got else 0
        tally.note(
            f"{kind}: wrong token at {first} of {len(got)} (max_tokens {max_tokens}, complete={complete})"
        )


async def client(
    stub, seed: int, until: float, chaos_done: asyncio.Event, pool, refs, tally: Tally, hang_s: float
) -> None:
    """Requests one after another until the time is up and the chaos loop has finished."""
    rng = random.Random(seed)
    while time.monotonic() < until or not chaos_done.is_set():
        await one_request(stub, rng, pool, refs, tally, hang_s)


async def chaos(
    procs: dict[str, Proc],
    until: float,
    interval: tuple[float, float],
    seed: int,
    tally: Tally,
    min_rounds: int,
    done: asyncio.Event,
) -> None:
    """Kill one worker at a time at random moments; start it again on the same port.

    Victims come in rounds, each worker once per round in a random order. The loop ends when
    the time is up and at least `min_rounds` rounds are complete (the load goes on until then).
    """
    rng = random.Random(seed)
    victims = [name for name in ("prefill", "decode-a", "decode-b", "draft") if name in procs]
    order: list[str] = []
    try:
        while True:
            await asyncio.sleep(rng.uniform(*interval))
            rounds = min(tally.kills[v] for v in victims)
            if time.monotonic() >= until and rounds >= min_rounds:
                return
            if not order:
                order = rng.sample(victims, len(victims))
            name = order.pop()
            procs[name].kill()
            tally.kills[name] += 1
            print(f"[soak] killed {name}", file=sys.stderr, flush=True)
            await asyncio.sleep(rng.uniform(0.5, 4.0))
            procs[name].start()
            await procs[name].wait_serving()
            print(f"[soak] {name} serving again", file=sys.stderr, flush=True)
    finally:
        done.set()


async def drained(procs: dict[str, Proc], timeout_s: float) -> dict[str, dict]:
    """Each worker's load once it is idle, or at the timeout: KV blocks in use count as leaked."""
    state = {}
    deadline = time.monotonic() + timeout_s
    for name, p in procs.items():
        if name == "scheduler":
            continue
        async with grpc.aio.insecure_channel(p.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            while True:
                load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
                busy = load.num_running or load.num_waiting or load.num_active_requests
                leaked = load.num_total_blocks - load.num_free_blocks
                if (not busy and not leaked) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
        state[name] = {
            "leaked_blocks": leaked,
            "total_blocks": load.num_total_blocks,
            "running": load.num_running,
            "waiting": load.num_waiting,
            "active": load.num_active_requests,
            "starts": p.starts,
        }
    return state


async def soak(args) -> dict:
    model = Path(args.model).resolve()
    draft = (
        None if args.no_draft else (Path(args.draft_model) if args.draft_model else model.parent / "draft")
    )
    if draft is not None and not (draft / "config.json").is_file():
        draft = None
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[soak] reference: HF transformers greedy on {args.prompts} prompts", file=sys.stderr, flush=True)
    pool = prompt_pool(model, args.prompts, args.seed)
    refs = greedy_reference(model, pool, args.max_tokens)
    procs = build_stack(model, draft.resolve() if draft else None, log_dir, args.num_blocks)
    tally = Tally()
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            await p.wait_serving()
        print(
            f"[soak] stack up ({', '.join(procs)}); load for {args.duration:.0f}s",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        until = started + args.duration
        async with grpc.aio.insecure_channel(procs["scheduler"].address) as channel:
            stub = generate_pb2_grpc.TandemStub(channel)
            chaos_done = asyncio.Event()
            clients = [
                client(stub, args.seed * 1000 + c, until, chaos_done, pool, refs, tally, args.hang_s)
                for c in range(args.concurrency)
            ]
            interval = tuple(args.kill_interval)
            killer = chaos(procs, until, interval, args.seed, tally, args.min_rounds, chaos_done)
            await asyncio.gather(killer, *clients)
        elapsed = time.monotonic() - started
        workers = await drained(procs, args.drain_s)
    finally:
        for p in procs.values():
            p.terminate()
    return {
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "model": model.name if model.name != "target" else model.parent.name,
        "draft": draft is not None,
        **{k: v for k, v in asdict(tally).items() if k not in ("statuses", "kills", "examples")},
        "leaked_blocks": sum(w["leaked_blocks"] for w in workers.values() if "leaked_blocks" in w),
        "statuses": dict(tally.statuses),
        "kills": dict(tally.kills),
        "workers": workers,
        "examples": tally.examples,
    }


def verdict(report: dict) -> list[str]:
    bad = []
    for key in ("wrong", "leaked_blocks", "hung", "failed_unclean"):
        if report[key]:
            bad.append(f"{key}={report[key]}")
    if not report["completed"]:
        bad.append("nothing completed")
    return bad


def render(report: dict) -> str:
    rows = [
        ("duration", f"{report['duration_s']} s, {report['concurrency']} clients, draft={report['draft']}"),
        ("kills", ", ".join(f"{k} x{v}" for k, v in sorted(report["kills"].items())) or "none"),
        ("requests sent", report["sent"]),
        ("completed", f"{report['completed']} ({report['tokens']} tokens)"),
        ("statuses", ", ".join(f"{k} {v}" for k, v in sorted(report["statuses"].items()))),
        ("failed, clean status", report["failed_clean"]),
        ("cancelled by the client", report["cancelled_by_client"]),
        ("failed, other status", report["failed_unclean"]),
        ("greedy outputs checked", report["checked"]),
        ("wrong outputs", report["wrong"]),
        ("KV blocks leaked", report["leaked_blocks"]),
        ("hung requests", report["hung"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft-model", default=None, help="default: <model>/../draft when it exists")
    p.add_argument("--no-draft", action="store_true", help="run without the draft service")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument(
        "--kill-interval",
        type=float,
        nargs=2,
        default=(15.0, 45.0),
        metavar=("MIN", "MAX"),
        help="seconds between kills, drawn uniformly (default 15 45)",
    )
    p.add_argument("--prompts", type=int, default=24, help="size of the prompt pool")
    p.add_argument("--max-tokens", type=int, default=64, help="longest request (and reference)")
    p.add_argument("--num-blocks", type=int, default=256, help="KV blocks per worker")
    p.add_argument("--hang-s", type=float, default=120.0, help="a request with no end after this is hung")
    p.add_argument(
        "--drain-s", type=float, default=30.0, help="time for workers to free everything at the end"
    )
    p.add_argument(
        "--min-rounds",
        type=int,
        default=0,
        help="go on past --duration until every worker was killed this many times (default 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="bench-results/soak-logs")
    p.add_argument("--out", default="bench-results/soak.json")
    args = p.parse_args(argv)
    report = asyncio.run(soak(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(render(report))
    bad = verdict(report)
    print(
        ("FAIL: " + ", ".join(bad)) if bad else "PASS: no wrong outputs, no leaked blocks, no hung requests"
    )
    for example in report["examples"]:
        print(f"  {example}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
