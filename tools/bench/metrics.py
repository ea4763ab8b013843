"""Serving metrics from request timelines, defined as `vllm bench serve` defines them.

A `Timeline` is what the client saw of one request: when it was sent, when each streamed chunk
arrived and how many tokens it carried, when the stream ended. From a run's timelines and its
duration (first send to last completion), for the successful requests:

    TTFT  = first chunk - send
    E2E   = end of stream - send
    TPOT  = (E2E - TTFT) / (output tokens - 1)        one value per request with > 1 output token
    ITL   = every gap between consecutive chunks      one value per gap, all requests pooled
    request throughput      = completed / duration
    output token throughput = output tokens / duration
    total token throughput  = (prompt + output tokens) / duration
    goodput                 = requests meeting every SLO given (TTFT <= slo, TPOT <= slo) / duration;
                              a request with one output token has TPOT 0 for this test (as vLLM)

Each latency gets mean, std, p50 (median), p90 and p99 in milliseconds (numpy's linear
interpolation, as vLLM); with no sample they are 0, as vLLM reports them.
Knows nothing of gRPC or engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Timeline:
    """One request as the client saw it; times in seconds on one monotonic clock."""

    send: float
    prompt_tokens: int
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried >= 1 token
    chunk_tokens: list[int] = field(default_factory=list)
    end: float | None = None
    output_tokens: int | None = None  # from the final usage; None: sum of chunk_tokens
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (usage.cached_tokens)
    error: str = ""

    def add_chunk(self, at: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.chunk_times.append(at)
            self.chunk_tokens.append(num_tokens)

    @property
    def success(self) -> bool:
        return not self.error and self.end is not None and bool(self.chunk_times)

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send

    @property
    def e2el(self) -> float:
        return self.end - self.send

    @property
    def tpot(self) -> float | None:
        n = self.num_output_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def summarize(values: list[float], prefix: str) -> dict[str, float]:
    """mean, std, median and percentiles of `values` (seconds) as `<stat>_<prefix>_ms`."""
    arr = np.asarray(values if values else [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{prefix}_ms": float(arr.mean()),
        f"std_{prefix}_ms": float(arr.std()),
        f"median_{prefix}_ms": float(np.median(arr)),
    }
    for p in PERCENTILES:
        out[f"p{p}_{prefix}_ms"] = float(np.percentile(arr, p))
    return out


def compute_metrics(
    timelines: list[Timeline],
    duration_s: float,
    *,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, float | int | None]:
    """The run's figures (names as vLLM's JSON: `request_throughput`, `p99_ttft_ms`, ...)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [t for t in timelines if t.success]
    ttfts = [t.ttft for t in ok]
    tpots = [t.tpot for t in ok if t.tpot is not None]
    itls = [gap for t in ok for gap in t.itls]
    e2els = [t.e2el for t in ok]
    total_input = sum(t.prompt_tokens for t in ok)
    total_output = sum(t.num_output_tokens for t in ok)
    total_cached = sum(t.cached_tokens for t in ok)

    good = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = 0
        for t in ok:
            meets_ttft = slo_ttft_ms is None or t.ttft * 1000.0 <= slo_ttft_ms
            meets_tpot = slo_tpot_ms is None or (t.tpot or 0.0) * 1000.0 <= slo_tpot_ms
            good += meets_ttft and meets_tpot

    out: dict[str, float | int | None] = {
        "num_requests": len(timelines),
        "completed": len(ok),
        "failed": len(timelines) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "request_goodput": None if good is None else good / duration_s,
        "goodput_fraction": None if good is None else (good / len(ok) if ok else 0.0),
        "prefix_cache_hit_ratio_client": total_cached / total_input if total_input else None,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(summarize(values, name))
    return out


def metric_keys() -> list[str]:
    """Every key `compute_metrics` returns (the smoke test checks the JSON for each)."""
    sample = Timeline(send=0.0, prompt_tokens=1, chunk_times=[0.1, 0.2], chunk_tokens=[1, 1], end=0.2)
    return list(compute_metrics([sample], 1.0, slo_ttft_ms=1.0, slo_tpot_ms=1.0))


def median_of_runs(runs: list[dict]) -> dict:
    """Field-wise median of several runs' metrics (None where any run has None)."""
    if not runs:
        return {}
    out = {}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if any(v is None for v in values):
            out[key] = None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = float(np.median(values))
        else:
            out[key] = values[0]
    return out
