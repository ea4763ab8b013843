"""A decode worker killed mid-stream, with real processes: a scheduler and two decode workers.

kill -9 of the decode worker that streams a request: the request continues on the other one
(re-prefilled with the tokens already sent); the client's tokens equal the greedy reference,
none repeated, none missing; the dead worker leaves routing at once. (SIGTERM with its grace
period is in test_services.py; a request moving after the grace period, and a restarted worker
coming back, in tests/integration/test_reliability_faults.py.)
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

from .procs import Service, free_port, serving

pytestmark = pytest.mark.slow

PROMPT = [1, *range(60, 100)]
MAX_TOKENS = 400


def request(prompt, max_tokens) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParameters(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    common = {"TANDEM_MODEL": str(tiny_model), "TANDEM_NUM_BLOCKS": "64", "TANDEM_GRACE_PERIOD_S": "1"}
    services = {
        name: Service("decode", {**common, "TANDEM_PORT": str(free_port())}, logs)
        for name in ("decode-a", "decode-b")
    }
    services["scheduler"] = Service(
        "scheduler",
        {
            **common,
            "TANDEM_PORT": str(free_port()),
            "TANDEM_HEALTH_INTERVAL_S": "0.2",
            "TANDEM_DECODE_ADDRS": ",".join(services[n].address for n in ("decode-a", "decode-b")),
        },
        logs,
    )
    with serving(services):
        yield services


def worker_health(stub) -> dict[str, bool]:
    info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5)
    return {w.address: w.healthy for w in info.workers}


def wait_for(predicate, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def busy_decode(stack) -> str:
    """The name of the decode worker running a request now."""
    for _ in range(400):
        for name in ("decode-a", "decode-b"):
            service = stack[name]
            if service.proc.poll() is not None:
                continue
            with grpc.insecure_channel(service.address) as channel:
                load = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            if load.num_running:
                return name
        time.sleep(0.01)
    raise AssertionError("no decode worker is running the request")


def test_kill_9_mid_stream_continues_on_the_other_decode_worker(stack, reference):
    with grpc.insecure_channel(stack["scheduler"].address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        wait_for(lambda: all(worker_health(stub).values()) and len(worker_health(stub)) == 2)
        call = stub.Generate(request(PROMPT, MAX_TOKENS), timeout=120)
        first = [next(call) for _ in range(5)]
        victim = stack[busy_decode(stack)]
        victim.proc.send_signal(signal.SIGKILL)
        rest = list(call)
        tokens = [t for r in [*first, *rest] for t in r.token_ids]
        assert tokens == reference(PROMPT, MAX_TOKENS)  # nothing repeated, nothing missing
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == MAX_TOKENS
        assert victim.proc.wait(5) == -signal.SIGKILL
        log = stack["scheduler"].log()
        assert "resumes elsewhere" in log, log  # it did move mid-stream
        assert worker_health(stub)[victim.address] is False  # out of routing at once
        assert len(list(stub.Generate(request(PROMPT, 4), timeout=30))) >= 1
