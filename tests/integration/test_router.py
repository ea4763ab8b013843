"""Routing policy of the scheduler, on a pool of fake workers (no servers)."""

from __future__ import annotations

import pytest

from services.scheduler.pool import WorkerHandle
from services.scheduler.router import NoDecodeWorker, PrefixMemory, Router
from shared.pb.tandem.v1 import worker_pb2


class FakePool:
    def __init__(self, *workers: WorkerHandle):
        self.workers = {w.address: w for w in workers}

    def healthy(self, role):
        return [w for w in self.workers.values() if w.role == role and w.healthy]


def worker(address, role, *, free=64, running=0, healthy=True) -> WorkerHandle:
    w = WorkerHandle(
        address, role, False, channel=None, call_channel=None, prefix=PrefixMemory(1000), healthy=healthy
    )
    w.info = worker_pb2.WorkerInfo(block_size=4)
    w.load = worker_pb2.WorkerLoad(num_free_blocks=free, num_total_blocks=64, num_running=running)
    return w


PROMPT = list(range(1, 18))  # 4 full blocks of 4 + 1 token


def test_decode_choice_prefers_a_fitting_worker_then_the_shortest_queue():
    busy, idle, full = (
        worker("d1", "decode", running=5),
        worker("d2", "decode"),
        worker("d3", "decode", free=2),
    )
    router = Router(FakePool(busy, full, idle), disagg_min_tokens=0)
    assert router.route(PROMPT).decode is idle
    idle.healthy = False
    assert router.route(PROMPT).decode is busy  # full has no queue but cannot hold the prompt


def test_prefill_choice_is_longest_cached_prefix_then_shortest_queue():
    d, p1, p2 = worker("d", "decode"), worker("p1", "prefill"), worker("p2", "prefill", running=3)
    router = Router(FakePool(d, p1, p2), disagg_min_tokens=0)
    assert router.route(PROMPT).prefill is p1  # no prefix anywhere: shortest queue
    p2.prefix.add(router.route(PROMPT[:12]).block_hashes)  # p2 holds the first 3 blocks
    route = router.route(PROMPT)
    assert route.prefill is p2 and route.cached_tokens_estimate == 12
    assert router.route([99, *PROMPT[1:]]).prefill is p1  # a different first block matches nothing


def test_begin_and_end_count_inflight_requests():
    d, p = worker("d", "decode"), worker("p", "prefill")
    router = Router(FakePool(d, p), disagg_min_tokens=0)
    route = router.route(PROMPT)
    router.begin(route)
    assert (d.num_inflight, p.num_inflight, d.num_pending_blocks) == (1, 1, 5)
    router.prefill_done(route)
    router.prefill_done(route)  # idempotent
    assert p.num_inflight == 0
    router.end(route)
    assert d.num_inflight == 0
    # both workers now remember the prompt's blocks
    assert router.route(PROMPT).cached_tokens_estimate == 16


def test_conditional_disaggregation():
    d, p = worker("d", "decode"), worker("p", "prefill")
    router = Router(FakePool(d, p), disagg_min_tokens=8)
    assert router.route(PROMPT[:7]).prefill is None  # short prompt: local
    assert router.route(PROMPT).prefill is p
    d.prefix.add(router.route(PROMPT[:12]).block_hashes)  # 12 of 17 tokens cached on d: 5 uncached
    assert router.route(PROMPT).prefill is None
    p.healthy = False
    assert router.route(list(range(50, 90))).prefill is None  # no healthy prefill worker


def test_no_healthy_decode_worker():
    router = Router(FakePool(worker("d", "decode", healthy=False)), disagg_min_tokens=0)
    with pytest.raises(NoDecodeWorker):
        router.route(PROMPT)


def test_prefix_memory_is_bounded_lru():
    memory = PrefixMemory(3)
    memory.add([1, 2, 3])
    memory.add([1])  # 1 becomes most recent
    memory.add([4])  # evicts 2
    assert len(memory) == 3
    assert memory.num_cached_blocks([1, 2, 3]) == 1
    assert memory.num_cached_blocks([1]) == 1
