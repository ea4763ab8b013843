"""HF baselines yield per-request timelines: own output lengths, batch timing, time limit."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.models import make_tiny_checkpoint
from tools.bench.baselines import load_hf_model, run_hf_one, run_hf_static, warm_up
from tools.bench.metrics import compute_metrics
from tools.bench.workloads import BenchRequest


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    return load_hf_model(str(make_tiny_checkpoint(tmp_path_factory.mktemp("hf"))), "float32", "cpu")


REQS = [
    BenchRequest([1, *range(5, 15)], 2),
    BenchRequest([1, 30, 31], 5),
    BenchRequest([1, *range(40, 60)], 3),
]


def test_static_batches_count_only_each_requests_own_tokens(model):
    warm_up(model, REQS, "cpu")
    timelines, duration = run_hf_static(model, REQS, batch_size=2, device="cpu")
    assert [t.num_output_tokens for t in timelines] == [2, 5, 3]
    assert [len(t.chunk_times) for t in timelines] == [2, 5, 3]
    a, b, c = timelines
    # one batch: both rows get each step's token at the same time; the short one is done first
    assert a.chunk_times == b.chunk_times[:2] and a.end < b.end
    # the second batch starts after the first one ran to its longest output
    assert c.chunk_times[0] > b.end
    assert all(t.send == a.send for t in timelines)  # all sent at the start of the run
    m = compute_metrics(timelines, duration)
    assert m["completed"] == 3 and m["total_output_tokens"] == 10


def test_one_at_a_time_queues_requests_behind_each_other(model):
    timelines, _ = run_hf_one(model, REQS, "cpu")
    assert [t.num_output_tokens for t in timelines] == [2, 5, 3]
    assert timelines[0].end < timelines[1].chunk_times[0] < timelines[1].end < timelines[2].chunk_times[0]


def test_nothing_starts_after_the_time_limit(model):
    timelines, _ = run_hf_one(model, REQS, "cpu", time_limit_s=0.0)
    assert timelines == []
    timelines, _ = run_hf_static(model, REQS, 2, "cpu", time_limit_s=0.0)
    assert timelines == []
