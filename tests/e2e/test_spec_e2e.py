"""Speculative decoding across real processes: scheduler, decode worker and draft service.

The draft may be missing, die mid-generation or come back: the client's greedy output is the
same token for token either way, and speculation resumes once the draft answers again."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.helpers.models import make_tiny_checkpoint

from .procs import Service, free_port, stop_all

pytestmark = pytest.mark.slow

# (prompt, max_tokens): concurrent requests of mixed lengths
REQUESTS = [
    ([1, *range(60, 100)], 64),
    ([1, 7, 8], 48),
    ([1, *range(200, 230)], 32),
    ([1, 30, 31, 32, 30, 31, 32], 56),
]
COMMON = {"TANDEM_GRACE_PERIOD_S": "0.5"}


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-draft-e2e"), std=0.07)


class Stack:
    def __init__(self, tiny_model, draft_model, logs):
        self.logs = logs
        self.draft_model = draft_model
        self.draft_port = free_port()
        self.metrics_port = free_port()
        self.draft: Service | None = None
        decode_port, sched_port = free_port(), free_port()
        self.decode = Service(
            "decode",
            {
                **COMMON,
                "TANDEM_MODEL": str(tiny_model),
                "TANDEM_PORT": str(decode_port),
                "TANDEM_NUM_BLOCKS": "128",
                "TANDEM_DRAFT_ADDR": f"127.0.0.1:{self.draft_port}",
                "TANDEM_DRAFT_TIMEOUT_S": "5",  # generous: these machines are busy
                "TANDEM_SPEC_ADAPTIVE": "0",  # always k: these tests check the mechanics
                "TANDEM_DRAFT_RETRY_S": "0.2",
                "TANDEM_METRICS_PORT": str(self.metrics_port),
            },
            logs,
        )
        self.scheduler = Service(
            "scheduler",
            {
                **COMMON,
                "TANDEM_MODEL": str(tiny_model),
                "TANDEM_PORT": str(sched_port),
                "TANDEM_DECODE_ADDRS": self.decode.address,
                "TANDEM_HEALTH_INTERVAL_S": "0.2",
            },
            logs,
        )

    def start_draft(self, wait: bool = True) -> None:
        env = {
            **COMMON,
            "TANDEM_MODEL": str(self.draft_model),
            "TANDEM_PORT": str(self.draft_port),
            "TANDEM_NUM_BLOCKS": "128",
        }
        self.draft = Service("draft", env, self.logs)
        if wait:
            self.draft.wait_serving()

    def spec_proposed(self) -> float:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        )
        line = next(ln for ln in text.splitlines() if ln.startswith("tandem_spec_proposed_tokens_total"))
        return float(line.split()[-1])

    def services(self) -> list[Service]:
        return [s for s in (self.scheduler, self.decode, self.draft) if s is not None]


@pytest.fixture(scope="module")
def stack(tiny_model, draft_model, tmp_path_factory):
    s = Stack(tiny_model, draft_model, tmp_path_factory.mktemp("spec-logs"))
    try:
        s.decode.wait_serving()
        s.scheduler.wait_serving()
        wait_decode_healthy(s.scheduler.address)
        yield s
    finally:
        stop_all(s.services())


def wait_decode_healthy(address: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        while not any(
            w.healthy for w in stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5).workers
        ):
            assert time.monotonic() < deadline, "the scheduler sees no healthy decode worker"
            time.sleep(0.1)


def request(prompt, max_tokens) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParameters(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


def run_concurrently(stack, requests, on_token=None) -> list[list[generate_pb2.GenerateResponse]]:
    results: list = [None] * len(requests)

    def one(i, prompt, max_tokens):
        try:
            with grpc.insecure_channel(stack.scheduler.address) as channel:
                stub = generate_pb2_grpc.TandemStub(channel)
                out = []
                for resp in stub.Generate(request(prompt, max_tokens), timeout=120):
                    out.append(resp)
                    if on_token is not None:
                        on_token(i, sum(len(r.token_ids) for r in out))
                results[i] = out
        except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
            results[i] = e

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def test_draft_down_from_the_start(stack, reference):
    assert stack.draft is None
    results = run_concurrently(stack, REQUESTS[:2])
    for (prompt, max_tokens), responses in zip(REQUESTS, results, strict=False):
        assert tokens_of(responses) == reference(prompt, max_tokens)
        assert responses[-1].usage.spec_proposed_tokens == 0
    assert "decoding without drafts" in stack.decode.log()


def test_draft_killed_mid_generation_then_back(stack, reference):
    stack.start_draft()
    # the draft is up: speculation starts (the decode worker retries it every 0.2 s)
    deadline = time.monotonic() + 30
    while True:
        with grpc.insecure_channel(stack.scheduler.address) as channel:
            warm = list(generate_pb2_grpc.TandemStub(channel).Generate(request([1, 5, 6], 8), timeout=60))
        if warm[-1].usage.spec_proposed_tokens > 0:
            break
        assert time.monotonic() < deadline, stack.decode.log()
        time.sleep(0.2)

    progress_at_kill: list[int] = []
    seen = [0] * len(REQUESTS)

    def on_token(i, n):
        seen[i] = n
        if not progress_at_kill and n >= 8:
            progress_at_kill.extend(seen)
            stack.draft.kill()
            stack.start_draft(wait=False)  # a new process, no state; it loads while the streams go on

    results = run_concurrently(stack, REQUESTS, on_token)
    assert progress_at_kill and any(
        n < max_tokens for n, (_, max_tokens) in zip(progress_at_kill, REQUESTS, strict=True)
    )
    for (prompt, max_tokens), responses in zip(REQUESTS, results, strict=True):
        assert tokens_of(responses) == reference(prompt, max_tokens)
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert any(r[-1].usage.spec_proposed_tokens > 0 for r in results)  # speculated before the kill

    # the new draft process is up: the decode worker speculates again
    before = stack.spec_proposed()
    stack.draft.wait_serving()
    deadline = time.monotonic() + 30
    while True:
        (responses,) = run_concurrently(stack, REQUESTS[2:3])
        assert tokens_of(responses) == reference(*REQUESTS[2])
        if responses[-1].usage.spec_proposed_tokens > 0:
            break
        assert time.monotonic() < deadline, stack.decode.log()
    assert stack.spec_proposed() > before
