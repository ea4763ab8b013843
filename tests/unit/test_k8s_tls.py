"""deploy/k8s/components/tls: mutual TLS and API keys on Kubernetes (docs/security.md).

Rendered with the real `kubectl kustomize` on top of each overlay and validated against the
Kubernetes schemas; then what the pods would only show at run time: each pod mounts only its own
certificate Secret, probes go through the TLS health check (the kubelet's gRPC probes speak no
TLS), workers register on the scheduler's internal port. And the one thing Kubernetes adds to
the TLS path: pods are dialled by IP, so certificates carry a shared name checked instead
(TANDEM_TLS_SERVER_NAME), here against a real server and the real health check script."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import GrpcServer
from services.common.tls import Tls
from tests.fakes.fake_kubelet import K8S_DIR, by_kind, render, role_of, tandem_container, write_kustomization
from tests.unit.test_k8s import K8S_VERSION, ROLES, env_of, settings_of, telemetry_variables
from tools.certs import Authority

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = K8S_DIR / "components" / "tls"
HEALTHCHECK = ["python", "deploy/compose/healthcheck.py"]


@pytest.fixture(scope="module", params=("gpu", "cpu"))
def objects(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"k8s-tls-{request.param}")
    write_kustomization(directory, resources=[K8S_DIR / "overlays" / request.param], components=[COMPONENT])
    return render(directory)


def tandem_deployments(objects) -> dict[str, dict]:
    return {
        role_of(d): d
        for d in by_kind(objects, "Deployment").values()
        if d["metadata"]["labels"].get("app.kubernetes.io/name") == "tandem"
    }


def test_the_component_renders_and_validates(objects):
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert set(tandem_deployments(objects)) == set(ROLES)


def test_each_pod_mounts_only_its_own_certificate_and_reads_it_from_there(objects):
    for role, deployment in tandem_deployments(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        expected = {f"tandem-tls-{role}"} | ({"tandem-api-keys"} if role == "scheduler" else set())
        assert secrets == expected, role
        tls = next(v for v in spec["volumes"] if v["name"] == "tandem-tls")
        assert tls["secret"]["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 1000
        mount = next(m for m in tandem_container(deployment)["volumeMounts"] if m["name"] == "tandem-tls")
        assert mount == {"name": "tandem-tls", "mountPath": "/etc/tandem/tls", "readOnly": True}
        env = env_of(objects, deployment)
        assert (env["TANDEM_TLS_CERT"], env["TANDEM_TLS_KEY"], env["TANDEM_TLS_CA"]) == (
            "/etc/tandem/tls/tls.crt",
            "/etc/tandem/tls/tls.key",
            "/etc/tandem/tls/ca.crt",
        )
        assert env["TANDEM_TLS_SERVER_NAME"] == "tandem-internal"
        allowed = settings_of(ROLES[role]) | telemetry_variables() | {"POD_IP", "POD_NAME", "POD_NAMESPACE"}
        assert set(env) <= allowed, (role, set(env) - allowed)


def test_probes_run_the_tls_health_check(objects):
    for role, deployment in tandem_deployments(objects).items():
        container = tandem_container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe], (role, probe)
            command = container[probe]["exec"]["command"]
            ready_service = role == "scheduler" and probe == "readinessProbe"
            assert command == HEALTHCHECK + (["--service", "tandem.v1.Tandem"] if ready_service else []), role


def test_workers_register_on_the_schedulers_internal_port_with_keys_on_the_scheduler(objects):
    deployments = tandem_deployments(objects)
    scheduler = tandem_container(deployments["scheduler"])
    assert {"name": "internal", "containerPort": 50055} in scheduler["ports"]
    env = env_of(objects, deployments["scheduler"])
    assert env["TANDEM_INTERNAL_PORT"] == "50055"
    assert env["TANDEM_API_KEYS_FILE"] == "/etc/tandem/api-keys/api-keys"
    for role in ("prefill", "decode"):
        assert env_of(objects, deployments[role])["TANDEM_SCHEDULER_ADDR"] == "tandem-scheduler-peers:50055"
    peers = by_kind(objects, "Service")["tandem-scheduler-peers"]
    assert peers["spec"]["ports"] == [
        {"name": "internal", "port": 50055, "targetPort": "internal", "appProtocol": "grpc"}
    ]
    public = by_kind(objects, "Service")["tandem-scheduler"]
    assert {p["port"] for p in public["spec"]["ports"]} == {50051, 8000}  # the internal port stays internal


# -- dialled by IP, checked by name -------------------------------------------------------------


def test_a_pod_dialled_by_ip_is_checked_against_the_shared_name(tmp_path):
    """Certificates naming only `tandem-internal` (no IP): a peer dialling 127.0.0.1 with
    TANDEM_TLS_SERVER_NAME=tandem-internal connects, without it the name check fails; the health
    check script does the same from the rendered environment, --service included."""
    ca = Authority()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    certs = {}
    for name in ("server", "peer"):
        cert, key = ca.issue(name, ["tandem-internal"])
        (tmp_path / f"{name}.crt").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        certs[name] = (cert, key)
    server_tls = Tls(cert=certs["server"][0], key=certs["server"][1], ca=ca.cert_pem)

    async def scenario():
        server = GrpcServer(host="127.0.0.1", port=0, service_names=["tandem.v1.Tandem"], tls=server_tls)
        port = await server.start()
        try:
            peer = Tls(cert=certs["peer"][0], key=certs["peer"][1], ca=ca.cert_pem)
            named = Tls(cert=peer.cert, key=peer.key, ca=peer.ca, server_name="tandem-internal")
            for tls, ok in ((named, True), (peer, False)):
                async with tls.aio_channel(f"127.0.0.1:{port}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                        assert ok
                    except grpc.aio.AioRpcError as e:
                        assert not ok and e.code() == grpc.StatusCode.UNAVAILABLE
            env = {
                "PATH": os.environ.get("PATH", ""),
                "TANDEM_PORT": str(port),
                "TANDEM_TLS_CERT": str(tmp_path / "peer.crt"),
                "TANDEM_TLS_KEY": str(tmp_path / "peer.key"),
                "TANDEM_TLS_CA": str(tmp_path / "ca.crt"),
                "TANDEM_TLS_SERVER_NAME": "tandem-internal",
            }
            for args, code in (([], 0), (["--service", "tandem.v1.Tandem"], 0), (["--service", "nope"], 1)):
                done = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "deploy/compose/healthcheck.py", *args],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert done.returncode == code, (args, done.stderr)
        finally:
            await server.stop(0)

    asyncio.run(scenario())
