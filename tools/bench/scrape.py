"""Figures the services count themselves, read from their Prometheus `/metrics` endpoints.

The benchmark scrapes every service before and after a measured run and reports the
difference, so warm-up traffic and earlier runs do not count:

    prefix_cache_hit_ratio = d(tandem_prefix_cache_hit_tokens) / d(tandem_prefix_cache_queried_tokens)
                             summed over the workers
    spec_acceptance_rate   = d(tandem_spec_accepted_tokens) / d(tandem_spec_proposed_tokens)
    spec_foreseen_share    = d(tandem_spec_draft_foreseen_calls) / d(tandem_spec_draft_call_seconds_count):
                             the draft calls a step took without waiting, drafted ahead
    spec_mean_k            = sum over k of k d(tandem_spec_steps{k}) / d(tandem_spec_steps): the drafts
                             per sequence the decode workers' policy chose, over the steps that could speculate
    usd_per_million_tokens = sum over services of d(tandem_gpu_cost_usd)
                             / d(tandem_generation_tokens) of the scheduler (else the decode workers) * 1e6
    scheduler_cpu_ms_per_token = d(tandem_process_cpu_seconds) of the scheduler
                             / d(tandem_generation_tokens) of the scheduler * 1000
                             (what the front door and relay cost per token: gRPC vs HTTP)

A figure whose counters no service exposes (a service without a metrics server, a counter the
services do not update yet) is None, never 0.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# sample name (labels dropped, values summed) -> value; a labelled sample (histogram buckets and
# quantiles aside) is also kept under its name with its labels: 'tandem_spec_steps_total{k="4"}'
Scrape = dict[str, float]


def parse(text: str) -> Scrape:
    """Samples of a Prometheus text exposition; samples differing only in labels are summed."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = float(sample.value)
            out[sample.name] = out.get(sample.name, 0.0) + value
            labels = {k: v for k, v in sample.labels.items() if k not in ("le", "quantile")}
            if labels and len(labels) == len(sample.labels):
                key = sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                out[key] = out.get(key, 0.0) + value
    return out


def scrape(url: str, timeout_s: float = 2.0) -> Scrape | None:
    """GET and parse one endpoint; None when nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def scrape_all(urls: dict[str, str]) -> dict[str, Scrape | None]:
    """{service name: scrape or None} for {service name: metrics URL}."""
    return {name: scrape(url) for name, url in urls.items()}


def _delta(before: Scrape | None, after: Scrape | None, name: str) -> float | None:
    if after is None or name not in after:
        return None
    return after[name] - (before or {}).get(name, 0.0)


def _sum_deltas(before: dict, after: dict, services, name: str) -> float | None:
    deltas = [_delta(before.get(s), after.get(s), name) for s in services]
    present = [d for d in deltas if d is not None]
    return sum(present) if present else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _mean_label(before: dict, after: dict, services, name: str, label: str) -> float | None:
    """The mean of a numeric label over the counts a labelled counter gained: sum of value x
    d(name{label=value}) / d(name), summed over the services."""
    prefix = f'{name}{{{label}="'
    keys = {key for s in services for key in (after.get(s) or {}) if key.startswith(prefix) and key.endswith('"}')}
    weighted = total = 0.0
    for key in keys:
        d = _sum_deltas(before, after, services, key) or 0.0
        weighted += float(key[len(prefix): -2]) * d
        total += d
    return weighted / total if total > 0 else None


def service_figures(before: dict[str, Scrape | None], after: dict[str, Scrape | None]) -> dict:
    """Windowed figures between two `scrape_all` results (keys: service names)."""
    services = list(after)
    workers = [s for s in services if s != "scheduler"]
    hit = _sum_deltas(before, after, workers, "tandem_prefix_cache_hit_tokens_total")
    queried = _sum_deltas(before, after, workers, "tandem_prefix_cache_queried_tokens_total")
    accepted = _sum_deltas(before, after, workers, "tandem_spec_accepted_tokens_total")
    proposed = _sum_deltas(before, after, workers, "tandem_spec_proposed_tokens_total")
    draft_s = _sum_deltas(before, after, workers, "tandem_spec_draft_call_seconds_sum")
    draft_calls = _sum_deltas(before, after, workers, "tandem_spec_draft_call_seconds_count")
    foreseen = _sum_deltas(before, after, workers, "tandem_spec_draft_foreseen_calls_total")
    cost = _sum_deltas(before, after, services, "tandem_gpu_cost_usd")
    generated = _delta(before.get("scheduler"), after.get("scheduler"), "tandem_generation_tokens_total")
    if not generated:
        decodes = [s for s in workers if s.startswith("decode")]
        generated = _sum_deltas(before, after, decodes, "tandem_generation_tokens_total")
    price = next(
        (a["tandem_gpu_hour_price_usd"] for a in after.values() if a and "tandem_gpu_hour_price_usd" in a),
        None,
    )
    return {
        "metrics_endpoints_answering": sorted(s for s, a in after.items() if a is not None),
        "prefix_cache_hit_ratio": _ratio(hit, queried),
        "spec_acceptance_rate": _ratio(accepted, proposed),
        "spec_proposed_tokens": proposed,
        "spec_accepted_tokens": accepted,
        # seconds of draft calls per proposed token, as the decode workers waited for them
        "spec_draft_s_per_proposed": _ratio(draft_s, proposed),
        "spec_mean_k": _mean_label(before, after, workers, "tandem_spec_steps_total", "k"),
        "spec_foreseen_share": _ratio(foreseen, draft_calls),
        "gpu_hour_price_usd": price,
        "usd_per_million_generated_tokens": None if cost is None else _ratio(cost * 1e6, generated),
        "scheduler_cpu_ms_per_token": _ratio(
            _scale(
                _delta(before.get("scheduler"), after.get("scheduler"), "tandem_process_cpu_seconds"), 1000.0
            ),
            _delta(before.get("scheduler"), after.get("scheduler"), "tandem_generation_tokens_total"),
        ),
    }


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


SERVICE_FIGURE_KEYS = (
    "metrics_endpoints_answering",
    "prefix_cache_hit_ratio",
    "spec_acceptance_rate",
    "spec_proposed_tokens",
    "spec_accepted_tokens",
    "spec_draft_s_per_proposed",
    "spec_mean_k",
    "spec_foreseen_share",
    "gpu_hour_price_usd",
    "usd_per_million_generated_tokens",
    "scheduler_cpu_ms_per_token",
)
