"""Prometheus metrics of one service, in its own registry, served over HTTP.

Each `Metrics` owns a `CollectorRegistry`, so several services in one test process do not
collide; every name starts with `tandem_`. A service updates only the metrics that mean
something for it (the scheduler has no KV blocks); the others stay at zero.

Cost estimate (gauge `tandem_estimated_cost_usd_per_million_generated_tokens`):

    gpu_cost_usd = uptime_hours * num_gpus * gpu_hour_usd
    usd_per_million_generated_tokens = gpu_cost_usd / generated_tokens * 1e6

With no price set (gpu_hour_usd None, TANDEM_GPU_HOUR_USD unset) the price and both cost
gauges read NaN: unset, not free (a process holding no GPU still costs 0).
uptime runs from the construction of `Metrics` (service start, model loading included: a
rented GPU is paid for while it loads). With no generated token yet the ratio is NaN.
It is the cost of this process's GPUs per token this process generated; for the whole
deployment, divide the sum of every service's `tandem_gpu_cost_usd` by one service's
token count (the scheduler's or decode's, not both: each generated token is counted by
both), e.g. in PromQL
`sum(tandem_gpu_cost_usd) / sum(tandem_generation_tokens_total{job="scheduler"}) * 1e6`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

# Buckets in seconds. TTFT and queue time span cached prefixes (ms) to long prompts on
# CPU (tens of s); inter-token latency is ms on GPU, ~100 ms for a small model on CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """The `tandem_*` metrics of one service process."""

    def __init__(
        self,
        service: str,
        *,
        gpu_hour_usd: float | None = None,
        num_gpus: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self.gpu_hour_usd = gpu_hour_usd
        self.num_gpus = num_gpus
        self._clock = clock
        self._started = clock()
        self._server = None
        self._server_thread = None
        r = self.registry

        info = Gauge(
            "tandem_service_info", "Constant 1, labelled with the service name.", ["service"], registry=r
        )
        info.labels(service=service).set(1)

        # Latency, per request (scheduler and decode observe these; see the docstrings).
        self.ttft_seconds = Histogram(
            "tandem_time_to_first_token_seconds",
            "Request arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "tandem_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_latency_seconds = Histogram(
            "tandem_e2e_request_latency_seconds",
            "Request arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time_seconds = Histogram(
            "tandem_request_queue_time_seconds",
            "Time a request waited before it was first scheduled.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )

        # Engine state, sampled each step.
        self.queue_depth = Gauge("tandem_queue_depth", "Requests waiting to be scheduled.", registry=r)
        self.running_sequences = Gauge(
            "tandem_running_sequences", "Sequences in the running batch.", registry=r
        )
        self.kv_blocks_used = Gauge("tandem_kv_blocks_used", "KV cache blocks in use.", registry=r)
        self.kv_blocks_total = Gauge("tandem_kv_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.kv_block_usage = Gauge(
            "tandem_kv_block_usage_ratio", "KV cache blocks in use / blocks in the pool.", registry=r
        )

        # Prefix cache: the ratio is over the process lifetime; use rate() of the two
        # counters for a windowed one.
        self.prefix_cache_queried_tokens = Counter(
            "tandem_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "tandem_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", registry=r
        )
        Gauge(
            "tandem_prefix_cache_hit_ratio",
            "Prefix cache hit tokens / queried tokens, since start.",
            registry=r,
        ).set_function(self._prefix_cache_hit_ratio)

        # Work done.
        self.preemptions = Counter(
            "tandem_preemptions", "Sequences preempted (recomputed later).", registry=r
        )
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated.", registry=r)
        self.spec_proposed_tokens = Counter(
            "tandem_spec_proposed_tokens", "Draft tokens proposed for verification.", registry=r
        )
        self.spec_accepted_tokens = Counter(
            "tandem_spec_accepted_tokens", "Draft tokens accepted by verification.", registry=r
        )
        self.spec_draft_call_seconds = Histogram(
            "tandem_spec_draft_call_seconds",
            "Each draft call as the decode worker waits for it: the draft service, or its draft in-process "
            "(one per speculating step; 0 for a step whose proposals the draft had drafted ahead).",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.spec_draft_foreseen = Counter(
            "tandem_spec_draft_foreseen_calls",
            "Draft calls whose proposals the draft service had drafted ahead (TANDEM_DRAFT_AHEAD): their step "
            "took them without waiting.",
            registry=r,
        )
        self.spec_steps = Counter(
            "tandem_spec_steps",
            "Decode steps that could speculate, by k: the drafts per sequence the speculation policy chose "
            "(0: a plain step; TANDEM_SPEC_ADAPTIVE=0 always chooses TANDEM_NUM_SPECULATIVE_TOKENS).",
            ["k"],
            registry=r,
        )
        self.kv_transfer_bytes = Counter(
            "tandem_kv_transfer_bytes", "KV cache bytes moved between workers.", ["transport"], registry=r
        )
        self.kv_transfer_seconds = Counter(
            "tandem_kv_transfer_seconds",
            "Time spent moving KV cache between workers.",
            ["transport"],
            registry=r,
        )

        # Cost (formula in the module docstring).
        Gauge(
            "tandem_gpu_hour_price_usd",
            "Configured price of one GPU-hour (TANDEM_GPU_HOUR_USD; NaN: unset).",
            registry=r,
        ).set(math.nan if gpu_hour_usd is None else gpu_hour_usd)
        Gauge("tandem_gpus", "GPUs held by this process.", registry=r).set(num_gpus)
        Gauge(
            "tandem_gpu_cost_usd", "uptime_hours * gpus * price per GPU-hour (NaN: price unset).", registry=r
        ).set_function(self.gpu_cost_usd)
        Gauge(
            "tandem_estimated_cost_usd_per_million_generated_tokens",
            "tandem_gpu_cost_usd / tandem_generation_tokens_total * 1e6 (NaN before the first token, "
            "or with the price unset).",
            registry=r,
        ).set_function(self.cost_per_million_tokens)
        # what a front door costs the scheduler per token, e.g. (tools/bench/scrape.py)
        Gauge(
            "tandem_process_cpu_seconds",
            "CPU seconds this process has used so far (user + system, all threads).",
            registry=r,
        ).set_function(time.process_time)

    # -- recording helpers: one call per event, so call sites stay one line ---------------

    def set_kv_blocks(self, used: int, total: int) -> None:
        self.kv_blocks_used.set(used)
        self.kv_blocks_total.set(total)
        self.kv_block_usage.set(used / total if total else 0.0)

    def record_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_queried_tokens.inc(queried_tokens)
        self.prefix_cache_hit_tokens.inc(hit_tokens)

    def record_kv_transfer(self, transport: str, num_bytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.labels(transport=transport).inc(num_bytes)
        self.kv_transfer_seconds.labels(transport=transport).inc(seconds)

    def record_spec_steps(self, before: tuple[int, ...], after: tuple[int, ...]) -> None:
        """The steps counted by k since `before` (engine counts, one per k)."""
        for k, n in enumerate(after):
            done = n - (before[k] if k < len(before) else 0)
            if done > 0:
                self.spec_steps.labels(k=str(k)).inc(done)

    def record_speculation(self, proposed: int, accepted: int) -> None:
        self.spec_proposed_tokens.inc(proposed)
        self.spec_accepted_tokens.inc(accepted)

    # -- derived values --------------------------------------------------------------------

    def uptime_seconds(self) -> float:
        return self._clock() - self._started

    def gpu_cost_usd(self) -> float:
        if self.num_gpus == 0:
            return 0.0
        if self.gpu_hour_usd is None:
            return math.nan  # unset, not free
        return self.uptime_seconds() / 3600.0 * self.num_gpus * self.gpu_hour_usd

    def cost_per_million_tokens(self) -> float:
        generated = _counter_value(self.generation_tokens)
        cost = self.gpu_cost_usd()
        if generated <= 0 or math.isnan(cost):
            return math.nan
        return cost / generated * 1e6

    def _prefix_cache_hit_ratio(self) -> float:
        queried = _counter_value(self.prefix_cache_queried_tokens)
        return _counter_value(self.prefix_cache_hit_tokens) / queried if queried else 0.0

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text format of this registry (what the HTTP endpoint serves)."""
        return generate_latest(self.registry)

    def start_server(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve `/metrics` on a daemon thread; port 0 binds a free port. Returns the bound port."""
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        self._server, self._server_thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP server, if one runs."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server_thread.join(timeout=5)
            self._server = self._server_thread = None


def start_metrics_server(metrics: Metrics, port: int = 0, addr: str = "127.0.0.1") -> int:
    """Serve `metrics` on `port` (0: a free one); returns the bound port. Stop with `metrics.close()`."""
    return metrics.start_server(port, addr)


def _counter_value(counter: Counter) -> float:
    # Read through collect(): the registry's own lookup would call back into the gauges
    # whose value functions are asking.
    for sample in counter.collect()[0].samples:
        if sample.name.endswith("_total"):
            return sample.value
    return 0.0
