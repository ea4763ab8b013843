"""In-process Tandem clusters for integration tests: real grpc.aio servers on free ports,
all in the pytest process (scheduler, decode and prefill workers, each with its own engine)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.decode.app import DecodeApp
from services.prefill.app import PrefillApp
from services.scheduler.app import SchedulerApp
from shared.config import SchedulerConfig, WorkerConfig, from_env
from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT_DIR = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 64
BLOCK_SIZE = 16


def worker_config(model: Path, role: str, **overrides) -> WorkerConfig:
    values = dict(
        model=str(model),
        role=role,
        host="127.0.0.1",
        port=0,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_seqs=8,
        max_batched_tokens=128,
        kv_chunk_bytes=1024,  # many chunks even for tiny prompts
        kv_timeout_s=20.0,
        grace_period_s=0.5,
        # these tests check speculation's mechanics (the tiny models rarely agree, so the adaptive
        # policy would turn it off); the policy has its own tests
        spec_adaptive=False,
    )
    values.update(overrides)
    return from_env(WorkerConfig, env={}, overrides=values)


def scheduler_config(model: Path, decodes: list[str], prefills: list[str], **overrides) -> SchedulerConfig:
    values = dict(
        model=str(model),
        host="127.0.0.1",
        port=0,
        decode_addrs=decodes,
        prefill_addrs=prefills,
        health_interval_s=0.1,
        grace_period_s=0.5,
        http_port=0,  # the HTTP API off unless a test asks for it (8000 would clash between tests)
    )
    values.update(overrides)
    return from_env(SchedulerConfig, env={}, overrides=values)


@dataclass
class Cluster:
    scheduler: SchedulerApp | None
    decodes: list[DecodeApp]
    prefills: list[PrefillApp]
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self.channels.append(channel)
        return channel

    @property
    def stub(self) -> generate_pb2_grpc.TandemStub:
        return generate_pb2_grpc.TandemStub(self._channel(self.scheduler.address))

    async def generate(self, **fields) -> list[generate_pb2.GenerateResponse]:
        """All responses of one Generate call through the scheduler."""
        return [r async for r in self.stub.Generate(make_request(**fields))]

    async def load(self, app) -> worker_pb2.WorkerLoad:
        return await worker_pb2_grpc.WorkerStub(self._channel(app.address)).GetLoad(
            worker_pb2.GetLoadRequest()
        )

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until every worker's blocks are all free and nothing runs (aborts are asynchronous)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for app in [*self.decodes, *self.prefills]:
            while True:
                load = await self.load(app)
                idle = load.num_free_blocks == load.num_total_blocks and not (
                    load.num_running or load.num_waiting
                )
                if idle and load.num_active_requests == 0:
                    break
                if loop.time() > deadline:
                    raise AssertionError(f"{app.role} worker not idle: {load}")
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.scheduler is not None:
            await self.scheduler.stop(0.2)
        for app in [*self.decodes, *self.prefills]:
            await app.stop(0.2)


def make_request(
    *,
    prompt: list[int] | str,
    max_tokens: int = 8,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    stop: list[str] = (),
    **sampling,
) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParameters(temperature=temperature, **sampling),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=ignore_eos, stop=list(stop)),
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


async def start_cluster(
    model: Path,
    *,
    num_prefill: int = 1,
    num_decode: int = 1,
    transport: str = "grpc",
    scheduler: bool = True,
    decode_overrides: dict | None = None,
    prefill_overrides: dict | None = None,
    scheduler_overrides: dict | None = None,
    telemetry=None,  # service name -> Telemetry, for tests that look at spans or metrics
) -> Cluster:
    telemetry = telemetry or (lambda name: None)
    prefills = [
        PrefillApp(
            worker_config(model, "prefill", kv_transport=transport, **(prefill_overrides or {})),
            telemetry=telemetry("tandem-prefill"),
        )
        for _ in range(num_prefill)
    ]
    decodes = [
        DecodeApp(
            worker_config(model, "decode", kv_transport=transport, **(decode_overrides or {})),
            telemetry=telemetry("tandem-decode"),
        )
        for _ in range(num_decode)
    ]
    for app in [*prefills, *decodes]:
        await app.start()
    sched = None
    if scheduler:
        sched = SchedulerApp(
            scheduler_config(
                model,
                [d.address for d in decodes],
                [p.address for p in prefills],
                **(scheduler_overrides or {}),
            ),
            telemetry=telemetry("tandem-scheduler"),
        )
        await sched.start()
        if decodes:
            await sched.pool.wait_ready("decode")
        if prefills:
            await sched.pool.wait_ready("prefill")
    return Cluster(sched, decodes, prefills)


def token_ids(responses: list[generate_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def text_of(responses: list[generate_pb2.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)
