"""The Kubernetes deployment without a cluster: the cpu overlay with the collective KV transport
(components/kv-collective, as the gpu overlay uses it), rendered by the real `kubectl kustomize`;
each Tandem pod's container command runs as a local process with the environment a kubelet
would give it (tests/fakes/fake_kubelet.py): its own pod IP (a distinct loopback address),
Service names resolving to pod IPs, /models a tiny checkpoint, Jaeger played by an OTLP receiver.

Nothing is configured with addresses: the scheduler learns its workers only from their
self-registration (TANDEM_ADVERTISE_ADDR=$(POD_IP):port through the tandem-scheduler Service).
Two decode replicas (the manifest's), one prefill, the draft and the scheduler serve a Generate,
its prompt KV crossing "pods" over the collective transport's TCPStore rendezvous; one decode
replica is killed mid-stream and the request migrates to the other, nothing repeated or lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.fakes.fake_kubelet import (
    K8S_DIR,
    PodIdentity,
    by_kind,
    command_of,
    config_maps,
    pod_process_env,
    render,
    service_hosts,
    tandem_container,
    write_kustomization,
)
from tests.helpers.otlp import OtlpReceiver

from .procs import Service

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [1, *range(60, 100)]
MAX_TOKENS = 300
STARTUP_S = 240.0  # generous: five processes importing torch at once on a small, busy machine
# the manifests' gRPC and metrics ports, which every simulated pod binds on its own IP
PORTS = (50051, 50052, 50053, 50054, 8000, 9461, 9462, 9463, 9464)


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def pick_pod_subnet() -> str:
    """127.a.b: a block of loopback addresses whose service ports are free (other tests on this
    host bind 127.0.0.1); skip where loopback aliases do not work."""
    for _ in range(20):
        prefix = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            with contextlib.ExitStack() as stack:
                for host in range(10, 60):
                    for port in PORTS:
                        s = stack.enter_context(socket.socket())
                        s.bind((f"{prefix}.{host}", port))
            return prefix
        except OSError:
            continue
    pytest.skip("no free block of 127.x.y.z addresses with the manifest's ports")


class Pod(Service):
    """A pod's container as a process: the manifest's command and environment (fake kubelet)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.port = int(env["TANDEM_PORT"])
        self.address = f"{env['TANDEM_HOST']}:{self.port}"
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,  # the image's WORKDIR /app is the repository, on its PYTHONPATH
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    kustomization = write_kustomization(
        tmp_path_factory.mktemp("kustomization"),
        resources=[K8S_DIR / "overlays" / "cpu"],
        components=[K8S_DIR / "components" / "kv-collective"],
    )
    objects = render(kustomization)
    models = tmp_path_factory.mktemp("models")
    (models / "target").symlink_to(tiny_model, target_is_directory=True)
    (models / "draft").symlink_to(tiny_model, target_is_directory=True)  # a perfect draft; cheap to make
    subnet = pick_pod_subnet()
    deployments = {
        d["metadata"]["name"]: d
        for d in by_kind(objects, "Deployment").values()
        if d["metadata"]["labels"].get("app.kubernetes.io/name") == "tandem"
    }
    pods, ips = [], {}
    for i, (name, deployment) in enumerate(sorted(deployments.items())):
        for replica in range(deployment["spec"]["replicas"]):
            ip = f"{subnet}.{10 + 10 * i + replica}"
            pods.append((f"{name}-{replica}", deployment, PodIdentity(f"{name}-{replica}", "tandem", ip)))
            ips.setdefault(name, ip)
    hosts = service_hosts(objects, ips)
    receiver = OtlpReceiver().start()
    logs = tmp_path_factory.mktemp("pod-logs")
    procs: dict[str, Pod] = {}
    try:
        for pod_name, deployment, identity in pods:
            container = tandem_container(deployment)
            (kv_port,) = free_ports(1)
            env = pod_process_env(
                container,
                config_maps(objects),
                identity,
                hosts=hosts,
                models_dir=models,
                host_ports={"TANDEM_KV_RECEIVER_PORT": kv_port},
            )
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tandem-jaeger:4317"  # no Jaeger pod here:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"  # the receiver plays it
            procs[pod_name] = Pod(pod_name, command_of(container), env, logs)
        for proc in procs.values():
            proc.wait_serving(STARTUP_S)
        yield procs, objects, receiver
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.stop()


def registered_workers(stub) -> dict[str, tuple[str, bool, bool]]:
    info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=5)
    return {w.address: (w.role, w.healthy, w.registered) for w in info.workers}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def busy_decode(procs) -> Pod:
    for _ in range(400):
        for pod in procs.values():
            if not pod.name.startswith("tandem-decode") or pod.proc.poll() is not None:
                continue
            with grpc.insecure_channel(pod.address) as channel:
                load = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            if load.num_running:
                return pod
        time.sleep(0.01)
    raise AssertionError("no decode pod is running the request")


def collective_bytes(pod: Pod) -> float:
    with urllib.request.urlopen(
        f"http://{pod.env['TANDEM_HOST']}:{pod.env['TANDEM_METRICS_PORT']}/metrics", timeout=5
    ) as r:
        text = r.read().decode()
    m = re.search(r'^tandem_kv_transfer_bytes_total\{transport="collective"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_pods_register_serve_and_a_killed_decode_replica_migrates_its_stream(cluster, reference):
    procs, _, _ = cluster
    scheduler = procs["tandem-scheduler-0"]
    decodes = [p for name, p in procs.items() if name.startswith("tandem-decode")]
    prefill = procs["tandem-prefill-0"]
    assert len(decodes) == 2 and len({p.address.split(":")[0] for p in procs.values()}) == len(procs)
    with grpc.insecure_channel(scheduler.address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        # only self-registration tells the scheduler where the workers are: their pod IPs
        expected = {p.address: ("decode", True, True) for p in decodes} | {
            prefill.address: ("prefill", True, True)
        }
        wait_for(lambda: registered_workers(stub) == expected, 60, "workers registered with their pod IPs")
        for pod in [*decodes, prefill]:
            assert pod.env["TANDEM_ADVERTISE_ADDR"] == pod.address  # $(POD_IP):port, expanded

        call = stub.Generate(
            generate_pb2.GenerateRequest(
                token_ids=common_pb2.TokenIds(ids=PROMPT),
                sampling=common_pb2.SamplingParameters(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True),
            ),
            timeout=120,
        )
        first = [next(call) for _ in range(5)]
        victim = busy_decode(procs)
        # the prompt's KV came from the prefill pod over the collective transport
        assert collective_bytes(victim) > 0
        victim.proc.send_signal(signal.SIGKILL)  # the node dies, or the pod is OOM-killed
        rest = list(call)
        tokens = [t for r in [*first, *rest] for t in r.token_ids]
        assert tokens == reference(PROMPT, MAX_TOKENS)  # nothing repeated, nothing missing
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert "resumes elsewhere" in scheduler.log(), scheduler.log()
        survivor = next(p for p in decodes if p is not victim)
        assert registered_workers(stub)[victim.address][1] is False
        assert collective_bytes(survivor) > 0, "the migrated request was prefilled again across pods"


def test_every_pod_serves_metrics_and_the_request_is_one_trace(cluster):
    procs, _, receiver = cluster
    for pod in procs.values():
        if pod.proc.poll() is not None:
            continue  # the killed decode replica
        with urllib.request.urlopen(
            f"http://{pod.env['TANDEM_HOST']}:{pod.env['TANDEM_METRICS_PORT']}/metrics", timeout=5
        ) as r:
            assert b"tandem_" in r.read(), pod.name
    with grpc.insecure_channel(procs["tandem-scheduler-0"].address) as channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        list(
            stub.Generate(
                generate_pb2.GenerateRequest(
                    token_ids=common_pb2.TokenIds(ids=PROMPT),
                    stopping=common_pb2.StoppingCriteria(max_tokens=4, ignore_eos=True),
                ),
                timeout=60,
            )
        )

    def one_trace_across_pods(spans):
        by_trace: dict[str, set[tuple[str, str]]] = {}
        for span in spans:
            pod = (span["service"], span["resource"].get("k8s.pod.name", ""))
            by_trace.setdefault(span["trace_id"], set()).add(pod)
        return any(
            {"tandem-scheduler", "tandem-prefill", "tandem-decode"} <= {service for service, _ in pods}
            and all(name.startswith(service) for service, name in pods)  # OTEL_RESOURCE_ATTRIBUTES
            for pods in by_trace.values()
        )

    assert one_trace_across_pods(receiver.wait_for_spans(one_trace_across_pods, timeout=20))


def test_the_openai_api_answers_on_the_scheduler_service_http_port(cluster):
    procs, objects, _ = cluster
    scheduler = procs["tandem-scheduler-0"]
    http_port = next(
        p["port"]
        for p in by_kind(objects, "Service")["tandem-scheduler"]["spec"]["ports"]
        if p["name"] == "http"
    )
    base = f"http://{scheduler.env['TANDEM_HOST']}:{http_port}/v1"
    with urllib.request.urlopen(f"{base}/models", timeout=10) as r:
        (model,) = [m["id"] for m in json.load(r)["data"]]
    assert model == scheduler.env["TANDEM_MODEL_NAME"]
    body = json.dumps({"model": model, "prompt": "def f(x):", "max_tokens": 3, "temperature": 0}).encode()
    request = urllib.request.Request(f"{base}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        completion = json.load(r)
    assert completion["usage"]["completion_tokens"] == 3
