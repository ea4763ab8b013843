"""Self-registration as Kubernetes needs it: a restarted scheduler learns its workers back from
their repeated registrations, and workers that went away for good (pods scaled down) are
forgotten, while configured ones stay."""

from __future__ import annotations

import asyncio

import grpc

from services.decode.app import DecodeApp
from services.prefill.app import PrefillApp
from services.scheduler.app import SchedulerApp
from shared.pb.tandem.v1 import generate_pb2_grpc

from .cluster import make_request, scheduler_config, token_ids, worker_config

PROMPT = [1, *range(40, 85)]


async def _until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_restarted_scheduler_gets_its_workers_back(tiny_model, reference):
    first = SchedulerApp(scheduler_config(tiny_model, [], []))
    port = await first.start()
    address = f"127.0.0.1:{port}"
    workers = [
        DecodeApp(worker_config(tiny_model, "decode", scheduler_addr=address, register_interval_s=0.2)),
        PrefillApp(worker_config(tiny_model, "prefill", scheduler_addr=address, register_interval_s=0.2)),
    ]
    second = None
    try:
        for w in workers:
            await w.start()
        await first.pool.wait_ready("decode", timeout_s=20)
        await first.pool.wait_ready("prefill", timeout_s=20)
        await first.stop(0)

        # a new scheduler process on the same address (a new pod behind the same Service):
        # nothing configured, it knows only who registers again
        second = SchedulerApp(scheduler_config(tiny_model, [], [], port=port))
        await second.start()
        await second.pool.wait_ready("decode", timeout_s=20)
        await second.pool.wait_ready("prefill", timeout_s=20)
        assert {(w.address, w.role, w.registered) for w in second.pool.workers.values()} == {
            (workers[0].address, "decode", True),
            (workers[1].address, "prefill", True),
        }
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = generate_pb2_grpc.TandemStub(channel)
            responses = [r async for r in stub.Generate(make_request(prompt=PROMPT, max_tokens=6))]
        assert token_ids(responses) == reference(PROMPT, 6)
        assert (workers[0].worker.num_local_prefills, workers[0].worker.num_remote_prefills) == (0, 1)
    finally:
        if second is not None:
            await second.stop(0)
        for w in workers:
            await w.stop(0)


async def test_gone_registered_workers_are_forgotten_configured_ones_kept(tiny_model):
    configured = DecodeApp(worker_config(tiny_model, "decode"))
    await configured.start()
    sched = SchedulerApp(scheduler_config(tiny_model, [configured.address], [], worker_expiry_s=0.5))
    await sched.start()
    address = f"127.0.0.1:{sched.server.port}"
    scaled = DecodeApp(worker_config(tiny_model, "decode", scheduler_addr=address, register_interval_s=0.1))
    try:
        await scaled.start()
        await _until(lambda: scaled.address in sched.pool.workers, what="registered")
        await _until(lambda: len(sched.pool.healthy("decode")) == 2, what="both healthy")
        # a steady registered worker is never forgotten, however long it runs
        await asyncio.sleep(1.0)
        assert scaled.address in sched.pool.workers

        await scaled.stop(0)  # the pod is scaled down: no more registrations, health fails
        await configured.stop(0)  # a configured worker that is down stays known
        await _until(lambda: scaled.address not in sched.pool.workers, what="scaled-down worker forgotten")
        await asyncio.sleep(1.0)
        assert configured.address in sched.pool.workers
        assert not sched.pool.workers[configured.address].healthy
    finally:
        await sched.stop(0)
        await scaled.stop(0)
        await configured.stop(0)
