"""A client that cancels, disconnects or runs out of time at any phase of its request (queued
in the scheduler, prefilling, moving KV, decoding, speculating with the n-gram proposer or the
draft service) frees all work and every KV block on every worker, the draft's included: the
block counts return to where they started. And the client's
deadline bounds every call downstream."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.decode.servicer import DecodeServicer
from services.draft.app import DraftApp
from services.prefill.servicer import PrefillServicer
from shared.config import DraftConfig, from_env
from shared.engine.spec import NgramProposer
from shared.pb.tandem.v1 import generate_pb2_grpc

from .cluster import make_request, start_cluster, token_ids

PROMPT = [1, *range(40, 85)]
REPETITIVE = [1, *([5, 6, 7, 8] * 10)]  # the n-gram proposer finds drafts in it


class Phase:
    """Holds a request in one phase until `release()`; `reached()` waits until it is there."""

    def __init__(self, cluster, name: str):
        self.c, self.name = cluster, name
        self.here = asyncio.Event()
        self.gate = asyncio.Event()  # set: let the held work go on
        self.blocker = None
        loop = asyncio.get_running_loop()
        if name in ("reserving", "prefill admission"):
            # the engine thread has done the caller's command (the decode worker's reservation,
            # the prefill worker's add_request) but the caller has not seen the result yet
            app, verb = (
                (cluster.decodes[0], "reserve")
                if name == "reserving"
                else (cluster.prefills[0], "add_request")
            )
            engine = app.aengine.engine
            done = getattr(engine, verb)

            def held_command(*args, **kwargs):
                result = done(*args, **kwargs)
                loop.call_soon_threadsafe(self.here.set)
                _wait_threadsafe(self.gate)
                return result

            setattr(engine, verb, held_command)
        elif name == "prefill":  # the prefill worker's engine step waits while the request is in it
            engine = cluster.prefills[0].aengine.engine
            step = engine.step

            def held_step():
                if engine.has_unfinished():
                    loop.call_soon_threadsafe(self.here.set)
                    _wait_threadsafe(self.gate)
                return step()

            engine.step = held_step
        elif name == "kv transfer":  # the prefill worker has the KV, the decode worker its blocks
            engine = cluster.prefills[0].aengine.engine
            export_kv = engine.export_kv

            def held_export(request_id):
                loop.call_soon_threadsafe(self.here.set)
                _wait_threadsafe(self.gate)
                return export_kv(request_id)

            engine.export_kv = held_export
        elif name in (
            "decode",
            "speculation",
            "draft speculation",
        ):  # slow steps: the request is still decoding when hit
            engine = cluster.decodes[0].aengine.engine
            step = engine.step
            # a speculating step yields up to k + 1 tokens: slower steps keep its 400 tokens
            # running past the 0.6 s deadline of the "deadline" case
            delay_s = 0.02 if name.endswith("speculation") else 0.005

            def slow_step():
                if not self.gate.is_set():
                    time.sleep(delay_s)
                return step()

            engine.step = slow_step

    async def start(self, stub, **call_kwargs):
        """Start the request under test (after whatever must run first); returns its call."""
        prompt = REPETITIVE if self.name.endswith("speculation") else PROMPT
        if self.name == "queued":  # the one running slot is taken
            self.blocker = self.c.stub.Generate(make_request(prompt=PROMPT, max_tokens=400))
            await self.blocker.read()
        if self.name == "speculation":
            await self.c.decodes[0].aengine.call(lambda eng: eng.set_proposer(NgramProposer()))
        return stub.Generate(make_request(prompt=prompt, max_tokens=400), **call_kwargs)

    async def reached(self, call) -> None:
        if self.name == "queued":
            while self.c.scheduler.frontend.admission.num_queued == 0:
                await asyncio.sleep(0.005)
        elif self.name in ("reserving", "prefill admission", "prefill", "kv transfer"):
            await self.here.wait()
        else:
            assert len(token_ids([await call.read(), await call.read()])) >= 2
            if self.name.endswith("speculation"):
                aengine = self.c.decodes[0].aengine
                while not await aengine.call(
                    lambda eng: any(r.num_spec_proposed for r in eng.requests.values())
                ):
                    await asyncio.sleep(0.005)

    async def release(self) -> None:
        self.gate.set()
        if self.blocker is not None:
            self.blocker.cancel()


def _wait_threadsafe(event: asyncio.Event, timeout_s: float = 10.0) -> None:
    """Block the calling (engine) thread until `event` is set (reading a flag is thread-safe)."""
    deadline = time.monotonic() + timeout_s
    while not event.is_set() and time.monotonic() < deadline:
        time.sleep(0.005)


PHASES = [
    "queued",
    "reserving",
    "prefill admission",
    "prefill",
    "kv transfer",
    "decode",
    "speculation",
    "draft speculation",
]


async def assert_all_freed(c) -> None:
    await c.wait_idle()  # every worker: all blocks free, nothing running, waiting or active
    admission = c.scheduler.frontend.admission
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while admission.num_running or admission.num_queued:
        assert loop.time() < deadline, (admission.num_running, admission.num_queued)
        await asyncio.sleep(0.01)
    assert all(w.num_inflight == 0 for w in c.scheduler.pool.workers.values())


@pytest.mark.parametrize("how", ["cancel", "disconnect", "deadline"])
@pytest.mark.parametrize("phase", PHASES)
async def test_client_gone_at_any_phase_frees_everything(tiny_model, phase, how):
    draft, decode = None, {}
    if phase == "draft speculation":  # the draft service: the target model drafting for itself
        draft = DraftApp(
            from_env(
                DraftConfig,
                env={},
                overrides=dict(
                    model=str(tiny_model), host="127.0.0.1", port=0, num_blocks=64, grace_period_s=0.2
                ),
            )
        )
        await draft.start()
        decode = dict(draft_addr=draft.address, draft_timeout_s=30.0)
    c = await start_cluster(
        tiny_model, decode_overrides=decode, scheduler_overrides={"max_inflight_per_decode": 1}
    )
    held = Phase(c, phase)
    try:
        channel = grpc.aio.insecure_channel(c.scheduler.address)  # this client's own connection
        c.channels.append(channel)
        stub = generate_pb2_grpc.TandemStub(channel)
        call = await held.start(stub, **({"timeout": 0.6} if how == "deadline" else {}))
        if how == "deadline":
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            await held.reached(call)
            if how == "cancel":
                call.cancel()
            else:  # the connection goes away, not just the call
                await channel.close()
        await held.release()
        await assert_all_freed(c)
        if draft is not None:  # the draft's copy of the sequence (its KV) is gone too
            await until_idle(c, draft)
        # the workers serve the next request normally
        assert len(token_ids(await c.generate(prompt=PROMPT, max_tokens=3))) == 3
    finally:
        await held.release()
        await c.stop()
        if draft is not None:
            await draft.stop(0.2)


async def until_idle(c, app, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        load = await c.load(app)
        if load.num_running == 0 and load.num_free_blocks == load.num_total_blocks:
            return
        assert loop.time() < deadline, f"not idle: {load}"
        await asyncio.sleep(0.02)


async def test_the_deadline_bounds_every_downstream_call(tiny_model, monkeypatch):
    """Decode and prefill workers see the client's deadline (what is left of it) on their calls."""
    seen: dict[str, float | None] = {}
    decode_generate, prefill_prefill = DecodeServicer.Generate, PrefillServicer.Prefill

    async def spy_generate(self, request, context):
        seen["decode"] = context.time_remaining()
        async for r in decode_generate(self, request, context):
            yield r

    async def spy_prefill(self, request, context):
        seen["prefill"] = context.time_remaining()
        async for r in prefill_prefill(self, request, context):
            yield r

    monkeypatch.setattr(DecodeServicer, "Generate", spy_generate)
    monkeypatch.setattr(PrefillServicer, "Prefill", spy_prefill)
    c = await start_cluster(tiny_model)
    try:
        responses = [r async for r in c.stub.Generate(make_request(prompt=PROMPT, max_tokens=4), timeout=20)]
        assert len(token_ids(responses)) == 4
        assert seen["decode"] is not None and seen["prefill"] is not None, seen
        # gRPC core sends a timeout rounded up to a coarse unit (a 20 s deadline can arrive as
        # 20.1 s): allow each hop that much slack
        slack = 0.15
        assert 0 < seen["prefill"] <= seen["decode"] + slack and seen["decode"] <= 20 + slack, seen
    finally:
        await c.stop()
