"""The compose deployment without Docker: each Tandem service of deploy/compose (CPU variant)
runs as a local process with exactly the command and environment its container would get
(service hostnames mapped to loopback, the /models mount to a tiny random checkpoint, Jaeger
played by an OTLP receiver), becomes healthy through the compose health check, and serves a
Generate through the scheduler's published port, disaggregated over prefill and decode. As in
the containers, every hop is mutual TLS with the certificates `make certs` writes
(TANDEM_CERTS_DIR), and the public API wants a key from its api-keys file.

What the containers need that this test cannot see is checked in tests/unit/test_compose.py.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import urllib.request
import warnings
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import Tls
from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from shared.text import Tokenizer
from tests.fakes.fake_compose import ContainerProcess, load_project
from tests.helpers.otlp import OtlpReceiver
from tools.certs import main as make_certs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
FILES = [COMPOSE_DIR / "docker-compose.yml", COMPOSE_DIR / "docker-compose.cpu.yml"]
TANDEM = ("draft", "prefill", "decode", "scheduler")  # an order that satisfies depends_on
PROMPT = [1, *range(40, 90)]
STARTUP_S = 240.0  # generous: five processes importing torch at once on a small, busy machine


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all sockets stay bound until every port is picked, so the OS
    cannot hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture(scope="module")
def deployment(tiny_model, tmp_path_factory):
    """The CPU compose deployment as local processes; yields (processes, variables, receiver)."""
    models = tmp_path_factory.mktemp("models")
    (models / "target").symlink_to(tiny_model, target_is_directory=True)
    (models / "draft").symlink_to(tiny_model, target_is_directory=True)  # a perfect draft; cheap to make
    ports = iter(free_ports(2 * len(TANDEM) + 3))
    certs = tmp_path_factory.mktemp("certs")
    assert make_certs(["--out", str(certs)]) == 0  # what `make certs` runs
    variables = {
        "TANDEM_CERTS_DIR": str(certs),
        # what a user would put in .env: the model, small KV pools, free ports on this host
        "TANDEM_MODELS_DIR": str(models),
        "TANDEM_TARGET_MODEL": "target",
        "TANDEM_DRAFT_MODEL": "draft",
        "TANDEM_NUM_BLOCKS": "64",
        "TANDEM_TORCH_THREADS": "1",
        "TANDEM_GRACE_PERIOD_S": "1",
        **{f"TANDEM_{name.upper()}_PORT": str(next(ports)) for name in TANDEM},
        **{f"TANDEM_{name.upper()}_METRICS_PORT": str(next(ports)) for name in TANDEM},
        "TANDEM_KV_RECEIVER_PORT": str(next(ports)),
        "TANDEM_HTTP_PORT": str(next(ports)),
    }
    model = load_project(FILES, variables)
    services = model["services"]
    receiver = OtlpReceiver().start()
    skipped = []
    if not (ROOT / "services/draft/__main__.py").is_file():
        skipped.append("draft")
        warnings.warn(
            "services/draft/__main__.py does not exist yet: the draft service of the compose file "
            "is not started (the decode worker decodes without it)",
            stacklevel=1,
        )
    procs: dict[str, ContainerProcess] = {}
    logs = tmp_path_factory.mktemp("compose-logs")
    try:
        for name in TANDEM:
            if name in skipped:
                continue
            proc = ContainerProcess.from_service(
                name,
                services[name],
                compose_dir=COMPOSE_DIR,
                repo_root=ROOT,
                service_names=list(services),
                port_map={("jaeger", 4317): receiver.port},
            )
            for dep, cond in (services[name].get("depends_on") or {}).items():
                if cond.get("condition") == "service_healthy" and dep in procs:
                    _wait_healthy(procs[dep], logs)
            proc.start(logs / f"{name}.log")
            procs[name] = proc
        _wait_healthy(procs["scheduler"], logs)
        yield procs, variables, receiver
    finally:
        for proc in reversed(list(procs.values())):  # scheduler first, as compose stops dependents first
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.terminate()
        for proc in procs.values():
            if proc.proc is not None:
                try:
                    proc.proc.wait(20)
                except Exception:  # noqa: BLE001 - a test failure must not leave processes behind
                    proc.proc.kill()
                    proc.proc.wait()
        receiver.stop()


def _wait_healthy(proc: ContainerProcess, logs: Path) -> None:
    """Until the service answers SERVING; then its compose health check must pass too."""
    deadline = time.monotonic() + STARTUP_S
    address = f"127.0.0.1:{proc.env['TANDEM_PORT']}"
    while not _serving(proc, address):
        if proc.proc.poll() is not None:
            log = (logs / f"{proc.name}.log").read_text()[-3000:]
            pytest.fail(f"{proc.name} exited with code {proc.proc.returncode}:\n{log}")
        if time.monotonic() > deadline:
            log = (logs / f"{proc.name}.log").read_text()[-3000:]
            pytest.fail(f"{proc.name} not healthy after {STARTUP_S:.0f}s:\n{log}")
        time.sleep(0.2)
    assert proc.healthy(), f"{proc.name}: the compose health check fails on a SERVING server"


def _tls_of(env: dict[str, str]) -> Tls:
    """The credentials a container has: its certificate and key, and the CA."""

    def read(name: str) -> bytes:
        return Path(env[name]).read_bytes()

    return Tls(cert=read("TANDEM_TLS_CERT"), key=read("TANDEM_TLS_KEY"), ca=read("TANDEM_TLS_CA"))


def _client_channel(variables: dict[str, str]) -> grpc.Channel:
    """An API client outside compose: TLS trusting the CA, no client certificate."""
    ca = (Path(variables["TANDEM_CERTS_DIR"]) / "ca.pem").read_bytes()
    address = f"127.0.0.1:{variables['TANDEM_SCHEDULER_PORT']}"  # the `ports:` mapping of the scheduler
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))


def _api_key(variables: dict[str, str]) -> list[tuple[str, str]]:
    lines = (Path(variables["TANDEM_CERTS_DIR"]) / "api-keys").read_text().splitlines()
    key = next(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))
    return [("authorization", f"Bearer {key}")]


def _serving(proc: ContainerProcess, address: str) -> bool:
    try:
        with _tls_of(proc.env).channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return status.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_containers_get_the_cpu_torch_settings_with_loopback_addresses(deployment):
    procs, variables, _ = deployment
    decode, scheduler = procs["decode"].env, procs["scheduler"].env
    assert (decode["TANDEM_ENGINE"], decode["TANDEM_DEVICE"]) == ("torch", "cpu")
    assert decode["TANDEM_MODEL"] == str(Path(variables["TANDEM_MODELS_DIR"]) / "target")
    assert scheduler["TANDEM_DECODE_ADDRS"] == f"127.0.0.1:{variables['TANDEM_DECODE_PORT']}"
    assert scheduler["TANDEM_PREFILL_ADDRS"] == f"127.0.0.1:{variables['TANDEM_PREFILL_PORT']}"
    assert decode["PYTHONPATH"] == str(ROOT), "the image's ENV PYTHONPATH=/app, /app being the repository"


def test_generate_through_the_published_scheduler_port(deployment, reference):
    procs, variables, _ = deployment
    request = generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParameters(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=12, ignore_eos=True),
    )
    with _client_channel(variables) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        with pytest.raises(grpc.RpcError) as err:  # the compose deployment wants a key
            list(stub.Generate(request, timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = _api_key(variables)
        responses = list(stub.Generate(request, timeout=60, metadata=key))
        info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=10, metadata=key)
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == reference(PROMPT, 12), "the deployment must generate what one engine generates"
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 12)
    roles = {w.role for w in info.workers if w.healthy}
    assert {"prefill", "decode"} <= roles, f"healthy workers: {info.workers}"


def test_the_http_api_is_published_over_https_with_keys(deployment):
    _, variables, _ = deployment
    ca = str(Path(variables["TANDEM_CERTS_DIR"]) / "ca.pem")
    url = f"https://127.0.0.1:{variables['TANDEM_HTTP_PORT']}"
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=ca), timeout=60) as client:
        assert client.post("/v1/completions", json=body).status_code == 401
        headers = {"Authorization": _api_key(variables)[0][1]}
        resp = client.post("/v1/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text


def test_every_service_serves_prometheus_metrics_on_its_compose_port(deployment):
    procs, variables, _ = deployment
    for name in procs:
        port = procs[name].env["TANDEM_METRICS_PORT"]
        assert port == variables[f"TANDEM_{name.upper()}_METRICS_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"tandem_" in resp.read(), f"{name}: no tandem_ metrics on :{port}"


def test_the_request_is_one_trace_in_jaeger(deployment):
    procs, variables, receiver = deployment
    with _client_channel(variables) as channel:
        list(
            generate_pb2_grpc.TandemStub(channel).Generate(
                generate_pb2.GenerateRequest(
                    token_ids=common_pb2.TokenIds(ids=PROMPT),
                    stopping=common_pb2.StoppingCriteria(max_tokens=4, ignore_eos=True),
                ),
                timeout=60,
                metadata=_api_key(variables),
            )
        )

    def one_trace_across_services(spans):
        by_trace: dict[str, set[str]] = {}
        for s in spans:
            by_trace.setdefault(s["trace_id"], set()).add(s["service"])
        return any(
            {"tandem-scheduler", "tandem-decode", "tandem-prefill"} <= names for names in by_trace.values()
        )

    # spans are exported in batches (every few seconds), to the endpoint compose gives: jaeger:4317
    spans = receiver.wait_for_spans(one_trace_across_services, timeout=20)
    assert one_trace_across_services(spans)


def test_the_draft_service_is_healthy(deployment):
    procs, _, _ = deployment
    if "draft" not in procs:
        pytest.skip(
            "services/draft/__main__.py does not exist yet: the compose draft service was not started"
        )
    assert procs["draft"].healthy()


def test_openai_sdk_through_the_published_http_port_joins_the_callers_trace(
    deployment, tiny_model, reference
):
    procs, variables, receiver = deployment
    base = f"https://127.0.0.1:{variables['TANDEM_HTTP_PORT']}/v1"  # the `ports:` mapping of the HTTP API
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    ca = ssl.create_default_context(cafile=str(Path(variables["TANDEM_CERTS_DIR"]) / "ca.pem"))
    key = _api_key(variables)[0][1].removeprefix("Bearer ")
    with openai.OpenAI(
        base_url=base, api_key=key, max_retries=0, timeout=60, http_client=httpx.Client(verify=ca)
    ) as client:
        model = client.models.list().data[0].id
        resp = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
            extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
    assert resp.choices[0].text == Tokenizer.from_dir(tiny_model).decode(reference(PROMPT, 12))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(PROMPT), 12)

    def in_the_callers_trace(spans):
        return {"tandem-scheduler", "tandem-decode", "tandem-prefill"} <= {
            s["service"] for s in spans if s["trace_id"] == trace_id
        }

    spans = receiver.wait_for_spans(in_the_callers_trace, timeout=20)
    assert in_the_callers_trace(spans)
    http = [s for s in spans if s["trace_id"] == trace_id and s["name"] == "POST /v1/completions"]
    assert http and http[0]["parent_span_id"] == "00f067aa0ba902b7"  # the caller's span is its parent


def test_services_stop_gracefully_on_sigterm(deployment):
    """`docker compose down` sends SIGTERM and waits: every service must exit 0 in time.
    (Last in this module: it stops the deployment.)"""
    procs, _, _ = deployment
    for proc in reversed(list(procs.values())):
        proc.proc.terminate()
    # within the compose file's stop_grace_period, after which Docker would SIGKILL them
    codes = {name: proc.proc.wait(timeout=30) for name, proc in procs.items()}
    assert codes == {name: 0 for name in procs}
