"""The OpenAI-compatible HTTP front's status codes, through the openai SDK against in-process
services: 429 with Retry-After past the admission queue (as gRPC's RESOURCE_EXHAUSTED), 503 with
no decode worker, 504 when X-Request-Timeout passes (queued, or mid-stream as an error event),
every KV block freed after each; and a stream running when the scheduler stops gracefully
still completes."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.procs import free_port

from .cluster import start_cluster

PROMPT = [1, *range(40, 85)]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


class SlowDecode:
    """The decode worker's steps take `delay_s` each (or wait for `open()` when gated)."""

    def __init__(self, app, delay_s: float = 0.0, gated: bool = False):
        self._open = threading.Event()
        if not gated:
            self._open.set()
        engine = app.aengine.engine
        step = engine.step

        def slow_step():
            self._open.wait(10)
            time.sleep(delay_s)
            return step()

        engine.step = slow_step

    def open(self) -> None:
        self._open.set()


async def http_cluster(tiny_model, **overrides):
    port = free_port()
    c = await start_cluster(tiny_model, num_prefill=0, scheduler_overrides={"http_port": port, **overrides})
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    return c, client, f"http://127.0.0.1:{port}"


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_past_the_admission_queue_429_with_retry_after(tiny_model):
    c, client, _ = await http_cluster(tiny_model, max_inflight_per_decode=1, max_queued_requests=0)
    gate = SlowDecode(c.decodes[0], gated=True)
    admission = c.scheduler.frontend.admission
    try:
        running = asyncio.ensure_future(
            client.completions.create(model=None, prompt=PROMPT, max_tokens=8, **GREEDY)
        )
        await until(lambda: admission.num_running == 1)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as e:
                await client.completions.create(prompt=PROMPT, max_tokens=4, stream=stream, model=None)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
            assert (
                e.value.body["type"] == "rate_limit_exceeded"
                and "TANDEM_MAX_QUEUED_REQUESTS" in e.value.body["message"]
            )
        gate.open()
        assert (await running).usage.completion_tokens == 8  # the admitted request was not disturbed
        await c.wait_idle()
    finally:
        gate.open()
        await client.close()
        await c.stop()


async def test_no_decode_worker_is_503(tiny_model):
    port = free_port()
    c = await start_cluster(tiny_model, num_prefill=0, num_decode=0, scheduler_overrides={"http_port": port})
    try:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0
        ) as cl:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as e:
                    await cl.completions.create(model=None, prompt=PROMPT, max_tokens=4, stream=stream)
                assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
    finally:
        await c.stop()


async def test_deadline_is_504_while_queued_and_an_error_event_mid_stream(tiny_model):
    c, client, _ = await http_cluster(tiny_model, max_inflight_per_decode=1)
    slow = SlowDecode(c.decodes[0], delay_s=0.02)
    admission = c.scheduler.frontend.admission
    try:
        blocker = asyncio.ensure_future(
            client.completions.create(model=None, prompt=PROMPT, max_tokens=60, **GREEDY)
        )
        await until(lambda: admission.num_running == 1)
        with pytest.raises(openai.APIStatusError) as e:  # waits in the queue past its deadline
            await client.completions.create(
                model=None, prompt=PROMPT, max_tokens=4, extra_headers={"X-Request-Timeout": "0.3"}
            )
        assert e.value.status_code == 504 and e.value.body["type"] == "timeout"
        assert admission.num_queued == 0  # it left the queue
        await blocker
        # mid-stream: the status line is sent; the deadline ends the stream with an error event
        stream = await client.completions.create(
            model=None,
            prompt=PROMPT,
            max_tokens=400,
            stream=True,
            extra_headers={"X-Request-Timeout": "1"},
            **GREEDY,
        )
        texts = []
        with pytest.raises(openai.APIError, match="deadline"):
            async for chunk in stream:
                texts.append(chunk.choices[0].text)
        assert texts  # tokens arrived before the deadline
        await c.wait_idle()  # and every KV block is free again
    finally:
        slow.open()
        await client.close()
        await c.stop()


async def test_a_stream_running_at_shutdown_completes_within_the_grace_period(tiny_model):
    c, client, base = await http_cluster(tiny_model)
    SlowDecode(c.decodes[0], delay_s=0.01)
    try:
        stream = await client.completions.create(
            model=None, prompt=PROMPT, max_tokens=40, stream=True, logprobs=0, **GREEDY
        )
        chunks = [await stream.__anext__()]
        stopping = asyncio.ensure_future(c.scheduler.stop(5.0))
        chunks += [chunk async for chunk in stream]
        await stopping
        c.scheduler = None  # stopped
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(len(ch.choices[0].logprobs.tokens) for ch in chunks) == 40  # every token arrived
        with pytest.raises(httpx.ConnectError):  # and then the port is closed
            async with httpx.AsyncClient() as http:
                await http.get(base + "/health")
    finally:
        await client.close()
        await c.stop()
