"""The load generator: send a workload on an arrival schedule, record each request's timeline.

A backend turns one `BenchRequest` into a stream and writes what arrives into the request's
`Timeline`; the load generator decides when each request is sent, caps how many are in flight,
and stamps the send time just before the backend's first call (as `vllm bench serve` does:
time spent waiting for a concurrency slot is not part of TTFT). Two backends live here:

- `GrpcBackend`: the public `Tandem.Generate` RPC over grpc.aio, one stream per request on
  one channel (loopback only).
- `HttpBackend`: the OpenAI-compatible HTTP API of the scheduler (POST /v1/completions,
  streamed as server-sent events) over aiohttp, as `vllm bench serve` drives OpenAI servers;
  one chunk per event that carries text, the token counts from the final usage event.
- `EngineBackend`: Tandem's engine in this process, through `AsyncEngine` (no gRPC at all).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from .metrics import Timeline
from .workloads import BenchRequest

clock = time.perf_counter


class Backend(Protocol):
    def prepare(self, req: BenchRequest) -> Any:
        """Build what `stream` sends (outside the timed section)."""

    async def stream(self, prepared: Any, tl: Timeline) -> None:
        """Send one request and fill `tl` (chunks, end, usage); raise or set tl.error on failure."""


async def run_load(
    backend: Backend,
    requests: Sequence[BenchRequest],
    offsets: Sequence[float],
    *,
    max_concurrency: int | None = None,
    time_limit_s: float | None = None,
) -> tuple[list[Timeline], float]:
    """Send `requests[i]` at `offsets[i]` seconds after the start; returns (timelines, duration).

    Requests not sent within `time_limit_s` are dropped (not counted); those still in flight at
    the limit are cancelled and count as failed. Duration runs from the start to the last end.
    """
    if len(offsets) != len(requests):
        raise ValueError("one arrival offset per request")
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = clock()
    deadline = start + time_limit_s if time_limit_s else math.inf
    timelines: list[Timeline] = []

    async def one(req: BenchRequest, offset: float) -> None:
        if start + offset >= deadline:
            return
        delay = start + offset - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is not None:
            await limit.acquire()
        try:
            if clock() >= deadline:
                return
            prepared = backend.prepare(req)
            tl = Timeline(send=clock(), prompt_tokens=len(req.prompt))
            timelines.append(tl)
            try:
                remaining = None if math.isinf(deadline) else max(0.0, deadline - clock())
                await asyncio.wait_for(backend.stream(prepared, tl), timeout=remaining)
            except asyncio.TimeoutError:
                tl.error = "cancelled at the time limit"
            except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
                tl.error = describe_error(e)
            if tl.end is None and not tl.error:
                tl.error = "stream ended without an end time"
        finally:
            if limit is not None:
                limit.release()

    await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets, strict=True)))
    return timelines, max(clock() - start, 1e-9)


def describe_error(e: BaseException) -> str:
    """One line: the gRPC status and details, or the exception's type and message."""
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return f"{type(e).__name__}: {e}"


class GrpcBackend:
    """The public Generate RPC: greedy, max_tokens = the request's output length, ignore_eos."""

    def __init__(self, address: str, timeout_s: float = 600.0):
        import grpc

        from shared.pb.tandem.v1 import generate_pb2_grpc

        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generate_pb2_grpc.TandemStub(self._channel)

    def prepare(self, req: BenchRequest):
        from shared.pb.tandem.v1 import common_pb2, generate_pb2

        return generate_pb2.GenerateRequest(
            token_ids=common_pb2.TokenIds(ids=req.prompt),
            sampling=common_pb2.SamplingParameters(temperature=0.0),
            stopping=common_pb2.StoppingCriteria(max_tokens=req.output_len, ignore_eos=True),
        )

    async def stream(self, prepared, tl: Timeline) -> None:
        from shared.pb.tandem.v1 import common_pb2

        async for resp in self._stub.Generate(prepared, timeout=self.timeout_s):
            tl.add_chunk(clock(), len(resp.token_ids))
            if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                tl.output_tokens = resp.usage.completion_tokens
                tl.cached_tokens = resp.usage.cached_tokens
                if resp.finish_reason == common_pb2.FINISH_REASON_ERROR:
                    tl.error = resp.finish_message or "error"
                elif resp.finish_reason == common_pb2.FINISH_REASON_CANCELLED:
                    tl.error = "cancelled"
        tl.end = clock()

    async def close(self) -> None:
        await self._channel.close()


class HttpBackend:
    """POST /v1/completions, streamed: greedy, max_tokens = the request's output length, ignore_eos;
    the prompt as token ids (the same tokens the gRPC backend sends)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        import aiohttp

        self.url = base_url.rstrip("/") + "/v1/completions"
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=0),  # no cap: the load generator caps concurrency
        )

    def prepare(self, req: BenchRequest):
        return {
            "prompt": req.prompt,
            "max_tokens": req.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def stream(self, prepared, tl: Timeline) -> None:
        import json

        async with self._session.post(self.url, json=prepared) as resp:
            if resp.status != 200:
                body = await resp.text()
                raise RuntimeError(f"HTTP {resp.status}: {body[:300]}")
            async for line in resp.content:  # one line at a time; events are "data: {...}" lines
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    tl.error = event["error"].get("message") or "error"
                    break
                for choice in event.get("choices") or ():
                    if choice.get("text"):
                        tl.add_chunk(clock(), 1)
                    if choice.get("finish_reason") in ("error", "cancelled"):
                        tl.error = choice["finish_reason"]
                usage = event.get("usage")
                if usage:
                    tl.output_tokens = usage["completion_tokens"]
                    tl.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        tl.end = clock()

    async def close(self) -> None:
        await self._session.close()


class EngineBackend:
    """Tandem's engine in this process (AsyncEngine: the step loop on its own thread)."""

    def __init__(self, engine_config):
        from shared.engine import AsyncEngine, LLMEngine

        self.engine = AsyncEngine(LLMEngine(engine_config)).start()
        self._ids = itertools.count()

    def prepare(self, req: BenchRequest):
        from shared.engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=True)
        return f"bench-{next(self._ids)}", req.prompt, params

    async def stream(self, prepared, tl: Timeline) -> None:
        request_id, prompt, params = prepared
        async for out in self.engine.generate(request_id, prompt, params):
            tl.add_chunk(clock(), len(out.new_token_ids))
            if out.finished:
                tl.output_tokens = out.num_output_tokens
                tl.cached_tokens = out.num_cached_tokens
                if out.finish_reason is not None and out.finish_reason.value in ("error", "cancelled"):
                    tl.error = out.finish_reason.value
        tl.end = clock()

    async def close(self) -> None:
        self.engine.shutdown()
