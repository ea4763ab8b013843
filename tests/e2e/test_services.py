"""The services as real processes: scheduler + prefill + decode, KV over torch.distributed (gloo)
between the two worker processes, workers registering themselves with the scheduler."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from shared.text import Tokenizer

from .procs import ROOT, Service, free_port, serving

pytestmark = pytest.mark.slow

PROMPT = [1, *range(60, 100)]


def request(prompt, max_tokens, **stopping) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParameters(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True, **stopping),
    )


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    sched_port = free_port()
    common = {"TANDEM_MODEL": str(tiny_model), "TANDEM_GRACE_PERIOD_S": "10"}
    worker = {
        **common,
        "TANDEM_NUM_BLOCKS": "64",
        "TANDEM_KV_TRANSPORT": "collective",
        "TANDEM_SCHEDULER_ADDR": f"127.0.0.1:{sched_port}",
    }
    services = {
        "scheduler": Service(
            "scheduler", {**common, "TANDEM_PORT": str(sched_port), "TANDEM_HEALTH_INTERVAL_S": "0.2"}, logs
        ),
        "prefill": Service("prefill", {**worker, "TANDEM_PORT": str(free_port())}, logs),
        "decode": Service("decode", {**worker, "TANDEM_PORT": str(free_port())}, logs),
    }
    with serving(services):
        yield services


def wait_registered(stub, timeout_s=30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5)
        if sorted((w.role, w.healthy, w.registered) for w in info.workers) == [
            ("decode", True, True),
            ("prefill", True, True),
        ]:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.2)


def test_generate_across_processes_equals_single_process(stack, reference):
    with grpc.insecure_channel(stack["scheduler"].address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        wait_registered(stub)
        responses = list(stub.Generate(request(PROMPT, 16), timeout=60))
        assert [t for r in responses for t in r.token_ids] == reference(PROMPT, 16)
        assert responses[-1].usage.completion_tokens == 16
    with grpc.insecure_channel(stack["decode"].address) as channel:
        load = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        assert load.num_free_blocks == load.num_total_blocks == 64
        # the internal API directly: prefilled by the peer, KV over the gloo pair group
        prompt = [1, *range(150, 170)]
        direct = list(
            worker_pb2_grpc.DecodeStub(channel).Generate(
                worker_pb2.DecodeRequest(
                    request_id="direct-1",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParameters(temperature=0.0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=6, ignore_eos=True),
                    prefill_peer=stack["prefill"].address,
                ),
                timeout=60,
            )
        )
    assert direct[0].prefilled_by == stack["prefill"].address
    assert [t for r in direct for t in r.token_ids] == reference(prompt, 6)


def test_cli_client_streams_text(stack, tiny_model, reference):
    tokenizer = Tokenizer.from_dir(tiny_model)
    prompt = "hello world"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.client",
            "--addr",
            stack["scheduler"].address,
            prompt,
            "--max-tokens",
            "12",
            "--ignore-eos",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    expected = tokenizer.decode(reference(tokenizer.encode(prompt), 12))
    assert out.stdout.rstrip("\n") == expected
    assert "[finish: length" in out.stderr and "completion 12" in out.stderr


def test_sigterm_lets_the_running_request_finish(stack, reference):
    """Last in the module: SIGTERM to the decode worker mid-request; the request still
    completes (grace period), health turns NOT_SERVING meanwhile, and the process exits 0."""
    decode = stack["decode"]
    with grpc.insecure_channel(stack["scheduler"].address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        call = stub.Generate(request(PROMPT, 300), timeout=120)
        first = next(call)
        decode.terminate()
        statuses = []

        def poll_health():  # while the request runs, the worker must stop looking healthy
            while call.running() and len(statuses) < 200:
                statuses.append(decode.health())

        poller = threading.Thread(target=poll_health)
        poller.start()
        rest = list(call)
        poller.join()
        tokens = [t for r in [first, *rest] for t in r.token_ids]
        assert tokens == reference(PROMPT, 300)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert decode.wait(30) == 0
        assert any(s != health_pb2.HealthCheckResponse.SERVING for s in statuses), statuses
        # the scheduler notices: no healthy decode worker left
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request(PROMPT, 4), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for name in ("scheduler", "prefill"):
        stack[name].terminate()
        assert stack[name].wait(30) == 0, stack[name].log()
