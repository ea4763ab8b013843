"""The load generator against a fake backend: send times, concurrency cap, time limit, failures."""

from __future__ import annotations

import asyncio

import pytest

from tools.bench.loadgen import clock, describe_error, run_load
from tools.bench.metrics import Timeline, compute_metrics
from tools.bench.workloads import BenchRequest


class FakeBackend:
    """Streams `output_len` one-token chunks, `step_s` apart, after `first_s`."""

    def __init__(self, first_s: float = 0.02, step_s: float = 0.01, fail_every: int = 0):
        self.first_s, self.step_s, self.fail_every = first_s, step_s, fail_every
        self.in_flight = self.max_in_flight = self.calls = 0

    def prepare(self, req: BenchRequest):
        return req

    async def stream(self, req: BenchRequest, tl: Timeline) -> None:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.fail_every and self.calls % self.fail_every == 0:
                raise ConnectionError("worker gone")
            await asyncio.sleep(self.first_s)
            for i in range(req.output_len):
                if i:
                    await asyncio.sleep(self.step_s)
                tl.add_chunk(clock(), 1)
            tl.output_tokens = req.output_len
            tl.end = clock()
        finally:
            self.in_flight -= 1


REQS = [BenchRequest([1, 2, 3], 4) for _ in range(6)]


def test_all_at_once_runs_concurrently_and_measures_the_backend():
    backend = FakeBackend()
    timelines, duration = asyncio.run(run_load(backend, REQS, [0.0] * 6))
    assert backend.max_in_flight == 6
    assert all(t.success for t in timelines)
    m = compute_metrics(timelines, duration)
    # sleeps never end early, but a busy host can stretch them: bound from below, loosely above
    assert 19 <= m["median_ttft_ms"] < 500
    assert 9 <= m["median_tpot_ms"] < 200
    assert duration < 5


def test_concurrency_cap_and_send_time_after_the_slot():
    backend = FakeBackend(first_s=0.05, step_s=0.0)
    timelines, _ = asyncio.run(run_load(backend, REQS, [0.0] * 6, max_concurrency=2))
    assert backend.max_in_flight == 2
    # waiting for a slot is not part of TTFT: every request's TTFT is the backend's own
    assert max(t.ttft for t in timelines) < 0.14  # the third wave waited >= 0.1 s for its slot
    sends = sorted(t.send for t in timelines)
    assert sends[-1] - sends[0] >= 2 * 0.05 * 0.9  # three waves of two


def test_arrival_offsets_are_honoured():
    backend = FakeBackend(first_s=0.0, step_s=0.0)
    start = clock()
    timelines, _ = asyncio.run(run_load(backend, REQS[:3], [0.0, 0.1, 0.2]))
    rel = sorted(t.send - start for t in timelines)
    # never early; a busy host may make them a little late
    assert 0.095 <= rel[1] < 0.19 and 0.195 <= rel[2] < 0.29


def test_time_limit_cancels_in_flight_and_drops_unsent():
    backend = FakeBackend(first_s=0.05, step_s=0.1)  # 0.35 s per request
    timelines, duration = asyncio.run(run_load(backend, REQS[:3], [0.0, 0.0, 0.5], time_limit_s=0.2))
    assert len(timelines) == 2  # the third was due after the limit
    assert all(t.error == "cancelled at the time limit" for t in timelines)
    assert duration < 1.0  # stopped near the 0.2 s limit, not after the 0.35 s requests
    assert compute_metrics(timelines, duration)["failed"] == 2


def test_a_failing_request_is_a_figure_not_a_crash():
    backend = FakeBackend(fail_every=3)
    timelines, duration = asyncio.run(run_load(backend, REQS, [0.0] * 6))
    m = compute_metrics(timelines, duration)
    assert (m["completed"], m["failed"]) == (4, 2)
    assert {t.error for t in timelines if t.error} == {"ConnectionError: worker gone"}


def test_grpc_errors_read_as_status_and_details():
    class FakeRpcError(Exception):
        def code(self):
            class Code:
                name = "UNAVAILABLE"

            return Code()

        def details(self):
            return "no healthy decode worker"

    assert describe_error(FakeRpcError()) == "UNAVAILABLE: no healthy decode worker"
    with pytest.raises(ValueError):
        asyncio.run(run_load(FakeBackend(), REQS, [0.0]))
