"""Overload: past the scheduler's admission queue (bounded by requests and by tokens) a request
is refused at once with RESOURCE_EXHAUSTED, while the admitted ones complete normally; waiting
requests are served highest priority first, FIFO within a priority."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from .cluster import make_request, start_cluster, token_ids

PROMPT = [1, *range(40, 85)]  # 46 tokens


class DecodeGate:
    """Holds the decode worker's engine steps until opened: admitted requests stay admitted."""

    def __init__(self, app):
        self._open = threading.Event()
        engine = app.aengine.engine
        step = engine.step

        def gated_step():
            self._open.wait(10)
            return step()

        engine.step = gated_step

    def open(self) -> None:
        self._open.set()


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def refused_fast(cluster, **fields) -> grpc.aio.AioRpcError:
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.generate(**fields)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert time.monotonic() - start < 1.0  # one round trip, not a wait
    return err.value


async def test_past_the_queue_bound_requests_are_refused_at_once_and_admitted_ones_complete(
    tiny_model, reference
):
    c = await start_cluster(
        tiny_model, scheduler_overrides={"max_inflight_per_decode": 2, "max_queued_requests": 2}
    )
    gate = DecodeGate(c.decodes[0])
    admission = c.scheduler.frontend.admission
    try:
        prompts = [[1, *range(10 + i, 50 + i)] for i in range(4)]
        admitted = [asyncio.ensure_future(c.generate(prompt=p, max_tokens=12)) for p in prompts]
        await until(lambda: (admission.num_running, admission.num_queued) == (2, 2))
        for _ in range(3):
            err = await refused_fast(c, prompt=PROMPT, max_tokens=4)
            assert "TANDEM_MAX_QUEUED_REQUESTS=2" in err.details()
        gate.open()
        for p, responses in zip(prompts, await asyncio.gather(*admitted), strict=True):
            assert token_ids(responses) == reference(p, 12)
        assert admission.num_rejected == 3
        await c.wait_idle()
    finally:
        gate.open()
        await c.stop()


async def test_the_queue_is_bounded_by_tokens_too(tiny_model, reference):
    c = await start_cluster(
        tiny_model, scheduler_overrides={"max_inflight_per_decode": 1, "max_queued_tokens": 100}
    )
    gate = DecodeGate(c.decodes[0])
    admission = c.scheduler.frontend.admission
    try:
        running = asyncio.ensure_future(c.generate(prompt=PROMPT, max_tokens=4))
        await until(lambda: admission.num_running == 1)
        queued = asyncio.ensure_future(c.generate(prompt=PROMPT, max_tokens=40))  # 86 tokens wait
        await until(lambda: admission.num_queued == 1)
        err = await refused_fast(c, prompt=PROMPT, max_tokens=40)  # 86 more: over 100
        assert "TANDEM_MAX_QUEUED_TOKENS=100" in err.details()
        gate.open()
        assert token_ids(await running) == reference(PROMPT, 4)
        assert token_ids(await queued) == reference(PROMPT, 40)
    finally:
        gate.open()
        await c.stop()


async def test_waiting_requests_run_highest_priority_first_fifo_within(tiny_model):
    c = await start_cluster(tiny_model, scheduler_overrides={"max_inflight_per_decode": 1})
    gate = DecodeGate(c.decodes[0])
    admission = c.scheduler.frontend.admission
    relay = c.scheduler.frontend.relay
    order: list[str] = []
    run = relay.run

    def spy_run(job, deadline):
        order.append(job.request_id)
        return run(job, deadline)

    relay.run = spy_run
    try:
        calls = []
        for name, priority in [("blocker", 0), ("a0", 0), ("b5", 5), ("c1", 1), ("d5", 5), ("e0", 0)]:
            req = make_request(prompt=PROMPT, max_tokens=2)
            req.request_id, req.priority = name, priority
            calls.append(asyncio.ensure_future(_collect(c.stub.Generate(req))))
            await until(lambda n=len(calls): admission.num_running + admission.num_queued == n)
        gate.open()
        await asyncio.gather(*calls)
        assert order == ["blocker", "b5", "d5", "c1", "a0", "e0"]
    finally:
        gate.open()
        await c.stop()


async def _collect(call) -> list:
    return [r async for r in call]
