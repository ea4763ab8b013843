"""Security across real processes: mutual TLS on every internal hop, TLS and API keys on the
public APIs (gRPC and the OpenAI-compatible HTTP API), worker registration only with a cluster
certificate.

One stack: scheduler, prefill, decode (KV over the gRPC stream) and draft, all with
certificates from a development CA (tools/certs.py), workers registering on the scheduler's
internal port. Each attack below is refused with its status, and the stack serves afterwards.
docs/security.md lists the threats and these tests."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import Tls
from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.models import make_tiny_checkpoint
from tests.helpers.otlp import OtlpReceiver
from tools.certs import Authority

from .procs import ROOT, Service, free_port, stop_all

pytestmark = pytest.mark.slow

KEY_A = "tandem-test-key-a-8f2d1c9e7b"
KEY_B = "tandem-test-key-b-41aa06d3f5"
WRONG = "tandem-test-key-x-000000000"
PROMPT = [1, *range(60, 100)]
SERVICES = ("scheduler", "prefill", "decode", "draft")


def request(prompt, max_tokens) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParameters(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


class Stack:
    def __init__(self, tiny_model, draft_model, tmp, receiver: OtlpReceiver):
        certs = tmp / "certs"
        self.ca = Authority()
        self.paths = self.ca.write(certs, [*SERVICES, "client"])
        rogue = Authority(common_name="rogue CA")  # same names, another CA
        self.rogue_paths = rogue.write(tmp / "rogue", ["decode", "client"])
        self.keys_file = tmp / "api-keys"
        self.keys_file.write_text(f"# test keys\n{KEY_A}\n\n{KEY_B}\n")
        logs = tmp / "logs"
        logs.mkdir()
        ports = {name: free_port() for name in SERVICES}
        self.internal_port = free_port()
        self.http_port = free_port()
        self.ca_file = certs / "ca.pem"

        def tls(name: str) -> dict[str, str]:
            cert, key = self.paths[name]
            return {
                "TANDEM_TLS_CERT": str(cert),
                "TANDEM_TLS_KEY": str(key),
                "TANDEM_TLS_CA": str(certs / "ca.pem"),
            }

        common = {
            "TANDEM_GRACE_PERIOD_S": "0.5",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "TANDEM_LOG_LEVEL": "debug",
        }
        registration = f"127.0.0.1:{self.internal_port}"
        worker = {
            **common,
            "TANDEM_MODEL": str(tiny_model),
            "TANDEM_NUM_BLOCKS": "128",
            "TANDEM_KV_TRANSPORT": "grpc",
            "TANDEM_SCHEDULER_ADDR": registration,
        }
        self.draft = Service(
            "draft",
            {**common, **tls("draft"), "TANDEM_MODEL": str(draft_model), "TANDEM_PORT": str(ports["draft"])},
            logs,
        )
        self.prefill = Service(
            "prefill",
            {
                **worker,
                **tls("prefill"),
                "TANDEM_PORT": str(ports["prefill"]),
                # by name: the worker dials the addresses it resolves to and checks the name on them
                "TANDEM_SCHEDULER_ADDR": f"localhost:{self.internal_port}",
            },
            logs,
        )
        self.decode = Service(
            "decode",
            {
                **worker,
                **tls("decode"),
                "TANDEM_PORT": str(ports["decode"]),
                "TANDEM_DRAFT_ADDR": self.draft.address,
                "TANDEM_DRAFT_TIMEOUT_S": "5",
                "TANDEM_DRAFT_RETRY_S": "0.2",
            },
            logs,
        )
        self.scheduler = Service(
            "scheduler",
            {
                **common,
                **tls("scheduler"),
                "TANDEM_MODEL": str(tiny_model),
                "TANDEM_PORT": str(ports["scheduler"]),
                "TANDEM_INTERNAL_PORT": str(self.internal_port),
                "TANDEM_HTTP_PORT": str(self.http_port),
                "TANDEM_HEALTH_INTERVAL_S": "0.2",
                "TANDEM_API_KEYS_FILE": str(self.keys_file),
                "TANDEM_API_KEY_MAX_CONCURRENCY": "1",
            },
            logs,
        )
        self.all = [self.scheduler, self.decode, self.prefill, self.draft]

    def client_tls(self, name: str = "client", *, rogue: bool = False) -> Tls:
        """A cluster peer's credentials: a certificate and the CA that signed it (or the rogue ones)."""
        paths = self.rogue_paths if rogue else self.paths
        cert, key = paths[name]
        ca = (cert.parent / "ca.pem").read_bytes()
        return Tls(cert=cert.read_bytes(), key=key.read_bytes(), ca=ca)

    def public_channel(self, *, rogue_ca: bool = False) -> grpc.Channel:
        """An API client's channel: TLS trusting the CA, no client certificate."""
        ca = (self.rogue_paths if rogue_ca else self.paths)["client"][0].parent / "ca.pem"
        return grpc.secure_channel(self.scheduler.address, grpc.ssl_channel_credentials(ca.read_bytes()))

    def http(self, *, rogue_ca: bool = False) -> httpx.Client:
        """An HTTP API client: HTTPS trusting the CA (or the rogue one)."""
        ca = (self.rogue_paths if rogue_ca else self.paths)["client"][0].parent / "ca.pem"
        context = ssl.create_default_context(cafile=str(ca))
        return httpx.Client(base_url=f"https://127.0.0.1:{self.http_port}", verify=context, timeout=60)

    def logs(self) -> str:
        return "".join(s.log_path.read_text() for s in self.all)


def _server_only_tls(stack: Stack, address: str) -> grpc.Channel:
    """TLS that trusts the cluster CA but presents no client certificate."""
    ca = (stack.paths["client"][0].parent / "ca.pem").read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-draft-security"), std=0.07)


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def stack(tiny_model, draft_model, tmp_path_factory, receiver):
    s = Stack(tiny_model, draft_model, tmp_path_factory.mktemp("security"), receiver)
    try:
        for service in (s.draft, s.prefill, s.decode, s.scheduler):
            service.wait_serving()
        wait_registered(s)
        yield s
    finally:
        stop_all(s.all)


def wait_registered(stack: Stack, timeout_s: float = 180.0) -> generate_pb2.ModelInfo:
    deadline = time.monotonic() + timeout_s
    with stack.public_channel() as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        while True:
            info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5, metadata=bearer(KEY_A))
            if sorted((w.role, w.healthy, w.registered) for w in info.workers) == [
                ("decode", True, True),
                ("prefill", True, True),
            ]:
                return info
            assert time.monotonic() < deadline, f"{info}\n{stack.scheduler.log()}"
            time.sleep(0.2)


def generate(
    stack: Stack, key: str | None, prompt=PROMPT, max_tokens=12
) -> list[generate_pb2.GenerateResponse]:
    with stack.public_channel() as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        return list(
            stub.Generate(request(prompt, max_tokens), timeout=120, metadata=bearer(key) if key else None)
        )


def tokens_of(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def assert_serves(stack: Stack, reference) -> None:
    assert tokens_of(generate(stack, KEY_A, max_tokens=6)) == reference(PROMPT, 6)


def refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


# -- the whole path with mutual TLS ------------------------------------------------------------


def test_disaggregated_generate_with_draft_over_mutual_tls(stack, reference):
    """scheduler -> decode -> prefill (KV on the gRPC stream) and decode -> draft, all mutual TLS:
    greedy output equals the single-process engine's (what the plaintext stacks produce)."""
    with stack.prefill.channel() as channel:
        before = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    deadline = time.monotonic() + 120
    while True:  # the decode worker speculates once its first draft call went through
        responses = generate(stack, KEY_A, max_tokens=24)
        assert tokens_of(responses) == reference(PROMPT, 24)
        if responses[-1].usage.spec_proposed_tokens > 0:
            break
        assert time.monotonic() < deadline, stack.decode.log()
    with stack.prefill.channel() as channel:
        after = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
    assert after.prefix_cache_query_tokens > before.prefix_cache_query_tokens  # prefilled on the peer

    # the internal API directly, as a cluster peer (a certificate the CA signed)
    prompt = [1, *range(150, 170)]
    with stack.client_tls().channel(stack.decode.address) as channel:
        direct = list(
            worker_pb2_grpc.DecodeStub(channel).Generate(
                worker_pb2.DecodeRequest(
                    request_id="mtls-direct",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParameters(temperature=0.0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=6, ignore_eos=True),
                    prefill_peer=stack.prefill.address,
                ),
                timeout=60,
            )
        )
    assert direct[0].prefilled_by == stack.prefill.address
    assert tokens_of(direct) == reference(prompt, 6)
    assert "TLS is OFF" not in stack.logs()


# -- API keys ----------------------------------------------------------------------------------


def test_requests_without_a_valid_key_are_unauthenticated(stack, reference):
    assert refused(lambda: generate(stack, None)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused(lambda: generate(stack, WRONG)).code() == grpc.StatusCode.UNAUTHENTICATED
    with stack.public_channel() as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        err = refused(lambda: stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        malformed = [("authorization", KEY_A)]  # no "Bearer"
        err = refused(lambda: list(stub.Generate(request(PROMPT, 2), timeout=30, metadata=malformed)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # probes need no key
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert_serves(stack, reference)
    assert tokens_of(generate(stack, KEY_B, max_tokens=6)) == reference(PROMPT, 6)  # either key


def test_a_key_removed_from_the_file_is_refused_from_the_next_call(stack, reference):
    assert tokens_of(generate(stack, KEY_B, max_tokens=4)) == reference(PROMPT, 4)
    stack.keys_file.write_text(f"{KEY_A}\n")  # KEY_B revoked
    try:
        assert refused(lambda: generate(stack, KEY_B)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert_serves(stack, reference)
    finally:
        stack.keys_file.write_text(f"{KEY_A}\n{KEY_B}\n")  # rotation back: the key works again
    assert tokens_of(generate(stack, KEY_B, max_tokens=4)) == reference(PROMPT, 4)


def test_one_key_runs_at_most_its_concurrency_limit(stack, reference):
    """TANDEM_API_KEY_MAX_CONCURRENCY=1: a second request of the same key while the first streams
    is RESOURCE_EXHAUSTED; another key is not affected; the slot comes back when the first ends."""
    with stack.public_channel() as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        long_call = stub.Generate(request(PROMPT, 200), timeout=120, metadata=bearer(KEY_A))
        first = next(long_call)
        try:
            err = refused(lambda: generate(stack, KEY_A, max_tokens=2))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "TANDEM_API_KEY_MAX_CONCURRENCY" in err.details()
            assert tokens_of(generate(stack, KEY_B, max_tokens=4)) == reference(PROMPT, 4)
        finally:
            rest = list(long_call)
    assert tokens_of([first, *rest]) == reference(PROMPT, 200)
    assert_serves(stack, reference)


def test_the_cli_client_speaks_tls_with_a_key(stack, tmp_path):
    """tools.client --ca --api-key-file (what docs/security.md tells users to run)."""
    keys = tmp_path / "my-key"
    keys.write_text(f"# mine\n{KEY_B}\n")
    base = [
        sys.executable,
        "-m",
        "tools.client",
        "--addr",
        stack.scheduler.address,
        "--ca",
        str(stack.ca_file),
    ]
    args = ["hello", "--max-tokens", "4", "--ignore-eos"]
    ok = subprocess.run(
        [*base, "--api-key-file", str(keys), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "completion 4" in ok.stderr
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEY"}  # no key at all
    refused = subprocess.run([*base, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert KEY_B not in ok.stderr + ok.stdout + refused.stderr


# -- the HTTP API -------------------------------------------------------------------------------


def completion(client: httpx.Client, key: str | None, max_tokens: int = 6) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json=body, headers=headers)


def test_http_api_is_https_and_needs_a_key(stack, reference):
    with stack.http() as client:
        for key in (None, WRONG):
            resp = completion(client, key)
            assert resp.status_code == 401, resp.text
            assert resp.headers["www-authenticate"] == "Bearer"
            assert resp.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/tokenizer_info").status_code == 401
        assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert client.post("/v1/responses", json={"input": "x"}).status_code == 401
        assert client.get("/health").status_code == 200  # probes need no key
        resp = completion(client, KEY_A)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 6
        grpc_text = "".join(r.text for r in generate(stack, KEY_B, max_tokens=6))
        assert resp.json()["choices"][0]["text"] == grpc_text  # the same greedy completion as gRPC
    # plaintext HTTP to the HTTPS port, and a client trusting another CA: no answer
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=10) as plain:
        with pytest.raises(httpx.HTTPError):
            completion(plain, KEY_A)
    with stack.http(rogue_ca=True) as client:
        with pytest.raises(httpx.ConnectError):
            completion(client, KEY_A)
    assert_serves(stack, reference)


def test_http_revocation_and_the_key_limit_shared_with_grpc(stack, reference):
    stack.keys_file.write_text(f"{KEY_A}\n")  # KEY_B revoked
    try:
        with stack.http() as client:
            assert completion(client, KEY_B).status_code == 401
    finally:
        stack.keys_file.write_text(f"{KEY_A}\n{KEY_B}\n")
    with stack.public_channel() as channel, stack.http() as client:
        long_call = generate_pb2_grpc.TandemStub(channel).Generate(
            request(PROMPT, 200), timeout=120, metadata=bearer(KEY_A)
        )
        next(long_call)
        try:
            resp = completion(client, KEY_A)  # KEY_A's one slot is held by the gRPC stream
            assert resp.status_code == 429 and resp.headers["retry-after"]
            assert completion(client, KEY_B).status_code == 200
        finally:
            list(long_call)
        assert completion(client, KEY_A).status_code == 200


# -- certificates ------------------------------------------------------------------------------


def test_peers_without_a_cluster_certificate_cannot_call_workers_or_register(stack, reference):
    register = worker_pb2.RegisterWorkerRequest(address="127.0.0.1:1", role="decode", model_name="")
    prefill_req = worker_pb2.PrefillRequest(
        request_id="rogue-prefill", prompt_token_ids=PROMPT, sampling=common_pb2.SamplingParameters()
    )
    decode_req = worker_pb2.DecodeRequest(request_id="rogue-decode", prompt_token_ids=PROMPT)
    internal = f"127.0.0.1:{stack.internal_port}"
    rogue_cert = stack.client_tls(rogue=True)  # a certificate, but signed by another CA
    for make_channel in (
        lambda addr: grpc.insecure_channel(addr),  # plaintext
        lambda addr: _server_only_tls(stack, addr),  # TLS, no client certificate
        lambda addr: grpc.secure_channel(
            addr,
            grpc.ssl_channel_credentials(
                stack.paths["client"][0].parent.joinpath("ca.pem").read_bytes(),
                rogue_cert.key,
                rogue_cert.cert,
            ),
        ),
    ):
        with make_channel(stack.prefill.address) as channel:
            err = refused(lambda: list(worker_pb2_grpc.PrefillStub(channel).Prefill(prefill_req, timeout=10)))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        with make_channel(stack.decode.address) as channel:
            err = refused(lambda: list(worker_pb2_grpc.DecodeStub(channel).Generate(decode_req, timeout=10)))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        with make_channel(stack.draft.address) as channel:
            err = refused(
                lambda: worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        with make_channel(internal) as channel:
            err = refused(lambda: worker_pb2_grpc.SchedulerStub(channel).RegisterWorker(register, timeout=10))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    # the public port completes TLS without a client certificate, so registration there is refused
    with stack.public_channel() as channel:
        err = refused(lambda: worker_pb2_grpc.SchedulerStub(channel).RegisterWorker(register, timeout=10))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    info = wait_registered(stack)
    assert "127.0.0.1:1" not in [w.address for w in info.workers]
    assert_serves(stack, reference)


def test_a_client_trusting_another_ca_does_not_connect(stack, reference):
    """The scheduler's certificate does not verify against a rogue CA: the client refuses it (so it
    never sends its key to an impostor either)."""
    with stack.public_channel(rogue_ca=True) as channel:
        err = refused(
            lambda: list(
                generate_pb2_grpc.TandemStub(channel).Generate(
                    request(PROMPT, 2), timeout=10, metadata=bearer(KEY_A)
                )
            )
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    # a worker trusting the rogue CA (and holding its certificate) cannot reach the cluster's decode
    with stack.client_tls("decode", rogue=True).channel(stack.decode.address) as channel:
        err = refused(
            lambda: worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert_serves(stack, reference)


def test_a_registration_cannot_replace_a_healthy_worker(stack, reference):
    """Even a peer with a cluster certificate cannot re-register a healthy worker's address under
    another role (and so divert prompts or KV)."""
    internal = f"127.0.0.1:{stack.internal_port}"
    with stack.client_tls().channel(internal) as channel:
        stub = worker_pb2_grpc.SchedulerStub(channel)
        resp = stub.RegisterWorker(
            worker_pb2.RegisterWorkerRequest(address=stack.decode.address, role="prefill"), timeout=10
        )
        assert not resp.accepted and "healthy decode worker" in resp.message
        same = stub.RegisterWorker(
            worker_pb2.RegisterWorkerRequest(address=stack.decode.address, role="decode"), timeout=10
        )
        assert same.accepted  # re-announcing itself is harmless: nothing changes
    info = wait_registered(stack)
    assert {w.address: w.role for w in info.workers}[stack.decode.address] == "decode"
    assert_serves(stack, reference)


def test_concurrent_refusals_do_not_disturb_running_requests(stack, reference):
    """Refused handshakes and keys while requests stream: every stream completes exactly."""
    results: list = []

    def run():
        results.append(tokens_of(generate(stack, KEY_B, max_tokens=40)))

    t = threading.Thread(target=run)
    t.start()
    for _ in range(5):
        refused(lambda: generate(stack, WRONG))
        with grpc.insecure_channel(stack.decode.address) as channel:
            refused(
                lambda: worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            )
    t.join(120)
    assert results == [reference(PROMPT, 40)]


# -- keys never leak ---------------------------------------------------------------------------


def test_keys_appear_in_no_log_and_no_span(stack, receiver):
    """Last: every call above carried keys (valid, wrong, revoked); none is in any service's log or
    any exported span attribute. A refused key is named by its hash id only."""
    spans = receiver.wait_for_spans(
        lambda spans: any(
            s["attributes"].get("rpc.grpc.status_code") == 16 for s in spans
        ),  # UNAUTHENTICATED
        timeout=30,
    )
    dumped = json.dumps(spans)
    logs = stack.logs()
    for key in (KEY_A, KEY_B, WRONG):
        assert key not in dumped
        assert key not in logs
    assert "refused an invalid API key (key id" in logs
