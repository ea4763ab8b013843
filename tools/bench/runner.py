"""Runs the scenarios of one system, `repeats` times each, and keeps every run's figures.

A system is a backend factory (Tandem's services over gRPC or over the OpenAI-compatible HTTP
API, the in-process engine) or an HF baseline. Each measured run draws its prompts afresh (`permute_tokens`: same lengths, other
tokens, same for every system), so no run hits a prefix cache with an earlier run's prompts
while the shared-prefix workload keeps its shared prefix. Services are scraped before and
after each run, so their counters cover that run only.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import zlib
from collections.abc import Callable

from .loadgen import run_load
from .metrics import compute_metrics, median_of_runs
from .scrape import SERVICE_FIGURE_KEYS, scrape_all, service_figures
from .workloads import BenchRequest, ModelShape, WorkloadSpec, arrival_offsets, make_workload, permute_tokens

SCRAPE_SETTLE_S = 0.75
# (factory of a backend, whether to close it after each run)
BackendFactory = tuple[Callable[[], object], bool]


class Runner:
    def __init__(self, args, shape: ModelShape):
        self.args = args
        self.shape = shape
        spec = WorkloadSpec(
            fixed_input=args.fixed_input,
            fixed_output=args.fixed_output,
            mixed_input_median=args.mixed_input_median,
            mixed_output_median=args.mixed_output_median,
            prefix_len=args.prefix_len,
            prefix_output=args.prefix_output,
            code_input=args.code_input,
            code_output=args.code_output,
        )
        self.spec = spec
        n, seed = args.num_requests, args.seed
        self.workloads = {name: make_workload(name, n, spec, shape, seed) for name in ("fixed", "mixed")}
        self.workloads["prefix"] = make_workload("prefix", args.num_prefix_requests, spec, shape, seed)
        # c1 (speculation): natural text when the tokenizer and the held-out sources are there
        self.c1_workload = "code"
        try:
            self.workloads["c1"] = make_workload("code", args.c1_requests, spec, shape, seed)
        except ValueError:
            self.c1_workload = "fixed"
            self.workloads["c1"] = self.workloads["fixed"][: args.c1_requests]
        self.workloads["sweep"] = self.workloads["mixed"][: args.sweep_requests]
        rate, burst, cap = args.request_rate, args.burstiness, args.max_concurrency
        self.scenarios = {
            "fixed": dict(workload="fixed", request_rate=rate, burstiness=burst, max_concurrency=cap),
            "mixed": dict(workload="mixed", request_rate=rate, burstiness=burst, max_concurrency=cap),
            "prefix": dict(
                workload="prefix",
                request_rate=math.inf,
                burstiness=1.0,
                max_concurrency=args.prefix_concurrency,
            ),
            "c1": dict(workload=self.c1_workload, request_rate=math.inf, burstiness=1.0, max_concurrency=1),
            "sweep": dict(workload="mixed", request_rate=None, burstiness=burst, max_concurrency=None),
        }

    def requests(
        self, scenario: str, repeat: int, rate_index: int = 0, variant: int = 0
    ) -> list[BenchRequest]:
        """The scenario's requests with tokens drawn afresh for (scenario, repeat, rate): other source
        windows for natural text, a permutation of the token ids (same lengths) for the rest.
        `variant` > 0: another draw for another backend on the same services (no cache hits on
        the prompts the first one just sent)."""
        key = f"{scenario}/{repeat}/{rate_index}" + (f"/{variant}" if variant else "")
        salt = zlib.crc32(key.encode())
        if scenario == "c1" and self.c1_workload == "code":
            return make_workload("code", self.args.c1_requests, self.spec, self.shape, self.args.seed + salt)
        return permute_tokens(self.workloads[scenario], self.shape, self.args.seed + salt)

    def warm_up(self, backend: BackendFactory) -> None:
        reqs = [BenchRequest(r.prompt[:32], 4) for r in self.requests("fixed", -1)[:2]]
        asyncio.run(_drive(backend, reqs, [0.0] * len(reqs), None, self.args.time_limit))

    def measure(
        self,
        backend: BackendFactory,
        scenario: str,
        repeat: int,
        *,
        rate: float | None = None,
        rate_index: int = 0,
        scrape_urls: dict[str, str] | None = None,
        variant: int = 0,
    ) -> dict:
        sc = self.scenarios[scenario]
        reqs = self.requests(scenario, repeat, rate_index, variant)
        offsets = arrival_offsets(
            len(reqs),
            sc["request_rate"] if rate is None else rate,
            sc["burstiness"],
            seed=self.args.seed + repeat,
        )
        before = scrape_all(scrape_urls) if scrape_urls else None
        timelines, duration = asyncio.run(
            _drive(backend, reqs, offsets, sc["max_concurrency"], self.args.time_limit)
        )
        figures = self.figures(timelines, duration)
        if scrape_urls:
            time.sleep(SCRAPE_SETTLE_S)  # let the services' last updates of this run land
            figures.update(service_figures(before, scrape_all(scrape_urls)))
        return figures

    def figures(self, timelines, duration: float) -> dict:
        figures = compute_metrics(
            timelines, duration, slo_ttft_ms=self.args.slo_ttft_ms, slo_tpot_ms=self.args.slo_tpot_ms
        )
        figures.update(dict.fromkeys(SERVICE_FIGURE_KEYS))
        figures["errors"] = sorted({t.error for t in timelines if t.error})[:5]
        return figures

    def run_system(
        self,
        name: str,
        scenarios: list[str],
        backend: BackendFactory,
        sweep_rates: Callable[[dict], list[float]],
        scrape_urls: dict[str, str] | None = None,
    ) -> dict:
        """Every scenario `repeats` times, then the rate sweep when `sweep_rates` gives rates."""
        return self.run_systems({name: backend}, scenarios, sweep_rates, scrape_urls)[name]

    def run_systems(
        self,
        backends: dict[str, BackendFactory],
        scenarios: list[str],
        sweep_rates: Callable[[dict], list[float]],
        scrape_urls: dict[str, str] | None = None,
        *,
        own_services: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, dict]:
        """Several backends, interleaved: each repeat of each scenario runs through every backend
        in turn (the order rotating from one repeat to the next), so that a change in the
        machine's load falls on all of them alike. Two uses:
        - ways into the same services (the gRPC and the HTTP front; `scrape_urls` their metrics):
          each backend sends its own draw of the prompts (same lengths, other tokens), so none
          finds the previous one's prompts in the prefix cache;
        - separate stacks, one per configuration (`own_services`: each backend's metrics URLs):
          every backend sends the same prompts, so that the configurations are compared on
          the same text.
        The sweep runs through the first only."""
        outs: dict[str, dict] = {name: {"results": {}, "sweep": []} for name in backends}

        def urls(name: str) -> dict[str, str] | None:
            return own_services[name] if own_services else scrape_urls

        for backend in backends.values():
            self.warm_up(backend)
        order = list(backends)
        for scenario in scenarios:
            runs: dict[str, list] = {name: [] for name in backends}
            for repeat in range(self.args.repeats):
                shift = repeat % len(order)
                for name in order[shift:] + order[:shift]:
                    figures = self.measure(
                        backends[name], scenario, repeat,
                        scrape_urls=urls(name), variant=0 if own_services else order.index(name),
                    )  # fmt: skip
                    runs[name].append(figures)
                    progress(name, scenario, repeat, figures)
            for name in backends:
                outs[name]["results"][scenario] = {"median": median_of_runs(runs[name]), "runs": runs[name]}
        name, backend = next(iter(backends.items()))
        out = outs[name]
        for i, rate in enumerate(sweep_rates(out)):
            sweep_runs = []
            for repeat in range(self.args.repeats):
                sweep_runs.append(
                    self.measure(
                        backend, "sweep", repeat, rate=rate, rate_index=i + 1, scrape_urls=urls(name),
                    )  # fmt: skip
                )
                progress(name, f"sweep@{rate:.3g}/s", repeat, sweep_runs[-1])
            out["sweep"].append(
                {"request_rate": rate, "median": median_of_runs(sweep_runs), "runs": sweep_runs}
            )
        return outs

    def run_hf(self, name: str, model, scenarios: list[str]) -> dict:
        """An HF baseline on the fixed and mixed workloads (all requests at once)."""
        from . import baselines

        args = self.args
        out: dict = {"results": {}, "sweep": []}
        baselines.warm_up(model, self.workloads["fixed"], args.device)
        for scenario in [s for s in scenarios if s in ("fixed", "mixed")]:
            runs = []
            for repeat in range(args.repeats):
                reqs = self.requests(scenario, repeat)
                if name == "hf_one":
                    timelines, duration = baselines.run_hf_one(
                        model, reqs[: args.hf_one_requests], args.device, args.time_limit
                    )
                else:
                    timelines, duration = baselines.run_hf_static(
                        model, reqs, args.static_batch, args.device, args.time_limit
                    )
                runs.append(self.figures(timelines, duration))
                progress(name, scenario, repeat, runs[-1])
            out["results"][scenario] = {"median": median_of_runs(runs), "runs": runs}
        return out


async def _drive(backend: BackendFactory, reqs, offsets, max_concurrency, time_limit):
    factory, close = backend
    b = factory()  # inside the event loop: grpc.aio channels belong to the loop that made them
    try:
        return await run_load(b, reqs, offsets, max_concurrency=max_concurrency, time_limit_s=time_limit)
    finally:
        if close:
            await b.close()


def progress(system: str, scenario: str, repeat: int, f: dict) -> None:
    print(
        f"[bench] {system:15} {scenario:15} #{repeat + 1}: {f['completed']}/{f['num_requests']} ok, "
        f"{f['output_throughput']:.1f} tok/s, TTFT p50 {f['median_ttft_ms']:.0f} ms, "
        f"TPOT p50 {f['median_tpot_ms']:.1f} ms",
        file=sys.stderr,
        flush=True,
    )
