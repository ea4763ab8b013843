"""The configurations under test, and Tandem's services started as real processes for each.

Process management is `tools/run_local.py`'s (start, wait until SERVING, stop); this module
only decides what to start: free loopback ports, and the environment of each service for a
configuration (aggregated = the decode worker prefills; disaggregated = one prefill worker and
one decode worker; prefix caching on or off; speculation with the draft service or the n-gram
proposer, when the workers have them). Every service also serves Prometheus `/metrics` on a port
of its own.
"""

from __future__ import annotations

import importlib.util
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path

from tools import run_local

SPECULATION = {
    "": "off",
    "draft": "on, draft model service",
    "draft-in-worker": "on, draft model inside the decode worker",
    "ngram": "on, n-gram prompt lookup",
}


@dataclass(frozen=True)
class Configuration:
    name: str
    disaggregated: bool = False
    prefix_caching: bool = True
    # "" (off), "draft" (the draft service), "draft-in-worker" (the draft model in the decode worker,
    # TANDEM_DRAFT_MODEL; as `tandem serve --spec`) or "ngram" (no model)
    speculation: str = ""
    adaptive: bool = True  # speculation: k per step from measured costs (TANDEM_SPEC_ADAPTIVE), or always k
    ahead: bool = False  # the draft service drafts ahead while the target verifies (TANDEM_DRAFT_AHEAD)
    transport: str = "stream"  # how the decode worker calls the draft service (TANDEM_DRAFT_TRANSPORT)

    @property
    def proposer(self) -> str:
        """The decode worker's TANDEM_SPEC_PROPOSER."""
        return {"": "none", "draft-in-worker": "draft"}.get(self.speculation, self.speculation)

    def describe(self) -> str:
        spec = SPECULATION[self.speculation]
        if self.speculation:
            spec += ", adaptive k" if self.adaptive else ", fixed k"
            if self.speculation == "draft" and self.ahead:
                spec += ", drafting ahead"
            if self.speculation == "draft" and self.transport != "stream":
                spec += f", called over {self.transport}"
        return (
            f"{'1 prefill + 1 decode worker' if self.disaggregated else 'decode worker prefills'}, "
            f"prefix caching {'on' if self.prefix_caching else 'off'}, speculation {spec}"
        )


CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("agg"),
        Configuration("disagg", disaggregated=True),
        Configuration("agg-nocache", prefix_caching=False),
        Configuration("disagg-nocache", disaggregated=True, prefix_caching=False),
        Configuration("agg-spec", speculation="draft"),
        Configuration("agg-spec-fixed", speculation="draft", adaptive=False),
        Configuration("agg-spec-ahead", speculation="draft", ahead=True),
        Configuration("agg-spec-grpc", speculation="draft", transport="grpc"),
        Configuration("agg-spec-local", speculation="draft-in-worker"),
        Configuration("disagg-spec", disaggregated=True, speculation="draft"),
        Configuration("agg-ngram", speculation="ngram"),
    )
}


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings shared by the workers and the in-process engine baseline."""

    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_batched_tokens: int = 512

    def env(self) -> dict[str, str]:
        env = {
            "TANDEM_DTYPE": self.dtype,
            "TANDEM_DEVICE": self.device,
            "TANDEM_BLOCK_SIZE": str(self.block_size),
            "TANDEM_MAX_NUM_SEQS": str(self.max_num_seqs),
            "TANDEM_MAX_BATCHED_TOKENS": str(self.max_batched_tokens),
        }
        if self.num_blocks:
            env["TANDEM_NUM_BLOCKS"] = str(self.num_blocks)
        return env

    def engine_config(self, model: str, prefix_caching: bool):
        from shared.engine import EngineConfig

        return EngineConfig(
            model=model,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_batched_tokens,
            enable_prefix_caching=prefix_caching,
        )


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def draft_model_dir(model: str) -> Path:
    """The demo pair's layout: <out>/target and <out>/draft."""
    return Path(model).resolve().parent / "draft"


def _worker_setting(env_name: str):
    """The worker config field read from `env_name`, or None while the workers have no such setting."""
    from shared.config import WorkerConfig

    return next((f for f in fields(WorkerConfig) if f.metadata.get("env") == env_name), None)


def unavailable_reason(config: Configuration, model: str) -> str | None:
    """Why `config` cannot run here (None: it can)."""
    if not config.speculation:
        return None
    proposer = _worker_setting("TANDEM_SPEC_PROPOSER")
    if proposer is None or config.proposer not in (proposer.metadata.get("choices") or ()):
        return f"speculation skipped: the decode worker has no {config.speculation} proposer yet"
    if config.speculation == "ngram":
        return None
    if config.speculation == "draft-in-worker" and _worker_setting("TANDEM_DRAFT_MODEL") is None:
        return "speculation skipped: the decode worker cannot run a draft model itself (TANDEM_DRAFT_MODEL)"
    if importlib.util.find_spec("services.draft") is None or _worker_setting("TANDEM_DRAFT_ADDR") is None:
        return "speculation skipped: the draft service (services/draft, TANDEM_DRAFT_ADDR) is not there yet"
    if not (draft_model_dir(model) / "config.json").is_file():
        return f"speculation skipped: no draft model at {draft_model_dir(model)}"
    return None


class Services:
    """`with Services(...) as s:` the configuration's processes, healthy; stopped on exit."""

    def __init__(
        self,
        model: str,
        config: Configuration,
        engine: EngineSettings,
        *,
        threads: int,
        gpu_hour_usd: float = 0.0,
        startup_timeout_s: float = 300.0,
        log_level: str = "warning",
    ):
        self.model = str(Path(model).resolve())
        self.config = config
        self.engine = engine
        self.threads = threads
        self.gpu_hour_usd = gpu_hour_usd
        self.startup_timeout_s = startup_timeout_s
        self.log_level = log_level
        self.procs: dict = {}
        self.addrs: dict[str, str] = {}
        self.metrics_urls: dict[str, str] = {}
        self.http_url = ""

    @property
    def address(self) -> str:
        return self.addrs["scheduler"]

    def plan(self) -> dict[str, tuple[str, dict[str, str]]]:
        names = ["scheduler", "decode"]
        if self.config.disaggregated:
            names.append("prefill")
        if self.config.speculation == "draft":
            names.append("draft")
        ports = free_ports(2 * len(names) + 1)
        for i, name in enumerate(names):
            self.addrs[name] = f"127.0.0.1:{ports[2 * i]}"
            self.metrics_urls[name] = f"http://127.0.0.1:{ports[2 * i + 1]}/metrics"
        self.http_url = f"http://127.0.0.1:{ports[-1]}"  # the scheduler's OpenAI-compatible API

        def base(name: str) -> dict[str, str]:
            return {
                "TANDEM_MODEL": self.model,
                "TANDEM_HOST": "127.0.0.1",
                "TANDEM_PORT": self.addrs[name].rsplit(":", 1)[1],
                "TANDEM_METRICS_PORT": self.metrics_urls[name].rsplit(":", 1)[1].split("/")[0],
                "TANDEM_GPU_HOUR_USD": str(self.gpu_hour_usd),
                "TANDEM_NUM_GPUS": "0"
                if name == "scheduler"
                else "1",  # a worker: one accelerator (or host share)
                "TANDEM_LOG_LEVEL": self.log_level,
                "TANDEM_LOG_JSON": "1",  # one line per event, errors included
                "TANDEM_GRACE_PERIOD_S": "0.5",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "",
                "TANDEM_TRACE_FILE": "",
            }

        worker = {
            **self.engine.env(),
            "TANDEM_TORCH_THREADS": str(self.threads),
            "TANDEM_PREFIX_CACHING": "1" if self.config.prefix_caching else "0",
            "TANDEM_KV_TRANSPORT": "grpc",
        }
        plan: dict[str, tuple[str, dict[str, str]]] = {}
        decode = {
            **base("decode"),
            **worker,
            "TANDEM_SPEC_PROPOSER": self.config.proposer,
            "TANDEM_SPEC_ADAPTIVE": "1" if self.config.adaptive else "0",
            "TANDEM_DRAFT_AHEAD": "1" if self.config.ahead else "0",
            "TANDEM_DRAFT_TRANSPORT": self.config.transport,
        }
        if self.config.speculation == "draft":
            draft_env = {**base("draft"), **worker, "TANDEM_MODEL": str(draft_model_dir(self.model))}
            plan["draft"] = ("services.draft", draft_env)
            decode["TANDEM_DRAFT_ADDR"] = self.addrs["draft"]
        if self.config.speculation == "draft-in-worker":
            decode["TANDEM_DRAFT_MODEL"] = str(draft_model_dir(self.model))
        plan["decode"] = ("services.decode", decode)
        if self.config.disaggregated:
            plan["prefill"] = ("services.prefill", {**base("prefill"), **worker})
        plan["scheduler"] = (
            "services.scheduler",
            {
                **base("scheduler"),
                "TANDEM_DECODE_ADDRS": self.addrs["decode"],
                "TANDEM_PREFILL_ADDRS": self.addrs.get("prefill", ""),
                "TANDEM_HTTP_PORT": self.http_url.rsplit(":", 1)[1],
                "TANDEM_HEALTH_INTERVAL_S": "0.5",
            },
        )
        return plan

    def __enter__(self) -> Services:
        try:
            for name, (module, env) in self.plan().items():
                self.procs[name] = run_local.start(name, module, env)
            run_local.wait_healthy(self.procs, {n: self.addrs[n] for n in self.procs}, self.startup_timeout_s)
            self._wait_routable(deadline=time.monotonic() + self.startup_timeout_s)
        except BaseException:
            run_local.stop_all(self.procs, grace_s=1)
            raise
        return self

    def _wait_routable(self, deadline: float) -> None:
        """Until the scheduler itself reports the workers healthy (its checks lag their start)."""
        import grpc

        from shared.pb.tandem.v1 import generate_pb2, generate_pb2_grpc

        wanted = {self.addrs[n] for n in ("decode", "prefill") if n in self.addrs}
        with grpc.insecure_channel(self.address) as channel:
            stub = generate_pb2_grpc.TandemStub(channel)
            while True:
                try:
                    info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=2.0)
                    if wanted <= {w.address for w in info.workers if w.healthy}:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the scheduler did not see {', '.join(sorted(wanted))} healthy in time"
                    )
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        run_local.stop_all(self.procs, grace_s=1)
