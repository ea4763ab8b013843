"""Self-registration as Kubernetes needs it: a restarted scheduler learns its workers back from
their repeated registrations; a worker registers with every scheduler its address resolves to
(a headless Service); workers that went away for good (pods scaled down) are forgotten, while
configured ones stay; a scheduler is ready for clients once a decode worker is."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import registration
from services.decode.app import DecodeApp
from services.prefill.app import PrefillApp
from services.scheduler.app import TANDEM_SERVICE, SchedulerApp
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
    sched = SchedulerApp(scheduler_config(tiny_model, [configured.address], [], worker_expiry_s=2.0))
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


async def test_a_worker_registers_with_every_scheduler_its_address_resolves_to(tiny_model, monkeypatch):
    """A headless Service name resolves to every scheduler pod: each one learns the worker."""
    schedulers = [SchedulerApp(scheduler_config(tiny_model, [], [])) for _ in range(2)]
    for s in schedulers:
        await s.start()
    addresses = [f"127.0.0.1:{s.server.port}" for s in schedulers]

    async def resolve(address):  # the DNS answer for the Service name: both pods
        assert address == "tandem-scheduler-peers:50051"
        return addresses

    monkeypatch.setattr(registration, "resolve_targets", resolve)
    decode = DecodeApp(
        worker_config(
            tiny_model, "decode", scheduler_addr="tandem-scheduler-peers:50051", register_interval_s=0.1
        )
    )
    try:
        await decode.start()
        for s in schedulers:
            await s.pool.wait_ready("decode", timeout_s=20)
            assert s.pool.workers[decode.address].registered
        assert decode.registrar.registered == set(addresses)
        # one scheduler goes away: the worker keeps registering with the other
        await schedulers[0].stop(0)
        addresses.pop(0)
        await _until(lambda: decode.registrar.registered == set(addresses), what="the gone scheduler dropped")
    finally:
        for s in schedulers:
            await s.stop(0)
        await decode.stop(0)


async def test_the_scheduler_is_ready_for_clients_once_a_decode_worker_is(tiny_model):
    """Health of tandem.v1.Tandem (the readiness probe): NOT_SERVING until a decode worker is healthy;
    the server's own health (startup and liveness probes) SERVING from the start."""
    sched = SchedulerApp(scheduler_config(tiny_model, [], []))
    await sched.start()
    decode = DecodeApp(
        worker_config(
            tiny_model, "decode", scheduler_addr=f"127.0.0.1:{sched.server.port}", register_interval_s=0.1
        )
    )
    try:
        async with grpc.aio.insecure_channel(sched.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service):
                return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

            assert await status("") == health_pb2.HealthCheckResponse.SERVING
            assert await status(TANDEM_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            await decode.start()
            await sched.pool.wait_ready("decode", timeout_s=20)
            await _until_async(lambda: status(TANDEM_SERVICE), health_pb2.HealthCheckResponse.SERVING)
    finally:
        await sched.stop(0)
        await decode.stop(0)


async def _until_async(get, want, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (got := await get()) != want:
        assert loop.time() < deadline, f"{got} != {want}"
        await asyncio.sleep(0.05)


async def test_registration_targets_are_the_addresses_a_name_resolves_to():
    assert await registration.resolve_targets("127.0.0.7:50051") == ["127.0.0.7:50051"]
    assert await registration.resolve_targets("localhost:50051") == ["127.0.0.1:50051"]
