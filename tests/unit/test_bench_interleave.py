"""`bench serve --interleave-configs` (what `make bench-spec` runs): the configurations take
turns on every repeat, the order rotating, with the same prompts for all, each scraped from its
own services; the ways into one stack keep their own draws of the prompts."""

from __future__ import annotations

from types import SimpleNamespace

from tools.bench.runner import Runner


class RecordingRunner(Runner):
    def __init__(self, repeats: int):  # no workloads: measure() is replaced
        self.args = SimpleNamespace(repeats=repeats)
        self.calls: list[tuple] = []

    def warm_up(self, backend) -> None:
        pass

    def measure(self, backend, scenario, repeat, *, rate=None, rate_index=0, scrape_urls=None, variant=0):
        self.calls.append((backend, scenario, repeat, scrape_urls, variant))
        return {"completed": 1, "num_requests": 1, "output_throughput": 1.0, "median_ttft_ms": 1.0,
                "median_tpot_ms": 1.0}


def test_separate_stacks_take_turns_with_the_same_prompts_and_their_own_metrics():
    runner = RecordingRunner(repeats=3)
    own = {"agg": {"decode": "http://a"}, "spec": {"decode": "http://b"}, "local": {"decode": "http://c"}}
    outs = runner.run_systems({name: name for name in own}, ["mixed", "c1"], lambda out: [], own_services=own)
    order = [(b, s, r) for b, s, r, _, _ in runner.calls]
    assert order[:3] == [("agg", "mixed", 0), ("spec", "mixed", 0), ("local", "mixed", 0)]
    assert order[3:6] == [("spec", "mixed", 1), ("local", "mixed", 1), ("agg", "mixed", 1)]  # rotated
    assert len(order) == 3 * 3 * 2
    for backend, _, _, urls, variant in runner.calls:
        assert urls == own[backend] and variant == 0
    assert all(len(outs[name]["results"]["c1"]["runs"]) == 3 for name in own)


def test_fronts_of_one_stack_draw_their_own_prompts_and_share_its_metrics():
    runner = RecordingRunner(repeats=1)
    urls = {"decode": "http://a"}
    runner.run_systems({"agg": "agg", "agg-http": "agg-http"}, ["mixed"], lambda out: [], urls)
    assert {(b, u is urls, v) for b, _, _, u, v in runner.calls} == {("agg", True, 0), ("agg-http", True, 1)}
