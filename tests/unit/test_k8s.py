"""deploy/k8s without a cluster: every overlay renders with the real `kubectl kustomize` and every
object validates against the Kubernetes 1.37 JSON schemas (kubernetes-validate, offline); then
what a cluster would only show at run time is checked here: GPU requests, gRPC probes on the
served ports, grace periods that cover the services' SIGTERM drain, autoscaling on metrics the
services export, and that every environment variable is a setting the service reads.

Running the pods' commands with their environment is tests/e2e/test_k8s_e2e.py.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import shared.telemetry.config as telemetry_config
from shared.config import DraftConfig, SchedulerConfig, WorkerConfig, from_env, telemetry_from_env
from shared.telemetry.metrics import Metrics
from tests.fakes.fake_kubelet import (
    K8S_DIR,
    PodIdentity,
    by_kind,
    container_env,
    expand,
    render,
    role_of,
    tandem_container,
    write_kustomization,
)

OVERLAYS = ("gpu", "cpu")
K8S_VERSION = "1.37.0"
ROLES = {"scheduler": SchedulerConfig, "prefill": WorkerConfig, "decode": WorkerConfig, "draft": DraftConfig}
MODEL_ROLES = ("prefill", "decode", "draft")
DOWNWARD_HELPERS = {"POD_IP", "POD_NAME", "POD_NAMESPACE"}
ADAPTER_VALUES = K8S_DIR / "autoscaling" / "prometheus-adapter-values.yaml"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S_DIR / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered():
    return {name: render(K8S_DIR / "overlays" / name) for name in OVERLAYS}


def tandem_deployments(objects) -> dict[str, dict]:
    """role -> Deployment of a Tandem service."""
    return {
        role_of(d): d
        for d in by_kind(objects, "Deployment").values()
        if d["metadata"]["labels"].get("app.kubernetes.io/name") == "tandem"
    }


def env_of(objects, deployment, ip="10.1.2.3") -> dict[str, str]:
    pod = PodIdentity(name=f"{deployment['metadata']['name']}-abc", namespace="tandem", ip=ip)
    return container_env(tandem_container(deployment), by_kind(objects, "ConfigMap"), pod)


def telemetry_variables() -> set[str]:
    """The variables documented (and read) by shared/telemetry/config.py."""
    names = set(re.findall(r"^\| `([A-Z0-9_]+)`", telemetry_config.__doc__, re.M))
    names |= set(re.findall(r", else `([A-Z0-9_]+)`", telemetry_config.__doc__))
    assert {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "TANDEM_METRICS_PORT"} <= names
    return names


def settings_of(cls) -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(cls)}


# -- rendering and schemas --------------------------------------------------------------------


def test_every_overlay_validates_against_the_kubernetes_schemas(overlay):
    name, objects = overlay
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    for obj in objects:
        # strict: unknown fields (a typo in a probe or a patch) fail too
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"tandem"}


def test_the_schema_check_catches_a_broken_object(rendered):
    """The validator above is not a no-op: a misspelled probe field and a bad type both fail."""
    deployment = copy.deepcopy(by_kind(rendered["gpu"], "Deployment")["tandem-decode"])
    tandem_container(deployment)["readinessProbe"]["grcp"] = {"port": 50053}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(by_kind(rendered["gpu"], "Deployment")["tandem-decode"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_base_renders_alone_and_every_service_runs(rendered):
    objects = render(K8S_DIR / "base")
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for name in OVERLAYS:
        assert set(tandem_deployments(rendered[name])) == set(ROLES)


# -- GPUs, resources ----------------------------------------------------------------------------


def test_gpu_overlay_gives_each_model_pod_one_gpu_and_the_rest_none(rendered):
    for role, deployment in tandem_deployments(rendered["gpu"]).items():
        resources = tandem_container(deployment)["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert gpus == ("1" if role in MODEL_ROLES else None), role
        assert resources["requests"].get("nvidia.com/gpu") == gpus, "extended resources: requests == limits"
        env = env_of(rendered["gpu"], deployment)
        if role in MODEL_ROLES:
            assert (env["TANDEM_DEVICE"], env["TANDEM_DTYPE"], env["TANDEM_NUM_GPUS"]) == (
                "cuda",
                "bfloat16",
                "1",
            )
            tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        else:
            assert env["TANDEM_NUM_GPUS"] == "0", "the cost gauge must not bill the scheduler for a GPU"


def test_cpu_overlay_requests_no_gpu_and_limits_torch_threads_to_its_cores(rendered):
    for role, deployment in tandem_deployments(rendered["cpu"]).items():
        resources = tandem_container(deployment)["resources"]
        assert "nvidia.com/gpu" not in resources["limits"]
        if role in MODEL_ROLES:
            env = env_of(rendered["cpu"], deployment)
            assert env["TANDEM_DEVICE"] == "cpu"
            assert int(env["TANDEM_TORCH_THREADS"]) <= float(resources["requests"]["cpu"])


def test_every_container_has_requests_and_limits(overlay):
    _, objects = overlay
    for deployment in by_kind(objects, "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            res = container["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], (deployment["metadata"]["name"], key)


# -- probes, ports, termination ---------------------------------------------------------------


def test_probes_are_native_grpc_health_checks_on_the_served_port(overlay):
    _, objects = overlay
    for role, deployment in tandem_deployments(objects).items():
        container = tandem_container(deployment)
        port = int(env_of(objects, deployment)["TANDEM_PORT"])
        assert {"name": "grpc", "containerPort": port} in container["ports"], role
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (role, probe)  # service "": the server
        # a scheduler is ready for clients once it has a decode worker (its Tandem service's health)
        ready = {"port": port, "service": "tandem.v1.Tandem"} if role == "scheduler" else {"port": port}
        assert container["readinessProbe"]["grpc"] == ready, role


def test_grace_periods_cover_the_drain(overlay):
    """SIGTERM -> NOT_SERVING -> TANDEM_GRACE_PERIOD_S for running calls -> exit: Kubernetes must
    not SIGKILL before, and liveness must not restart a pod that drains (it reports NOT_SERVING)."""
    _, objects = overlay
    for role, deployment in tandem_deployments(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        container = tandem_container(deployment)
        grace = float(env_of(objects, deployment)["TANDEM_GRACE_PERIOD_S"])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        # 10 s for the engine's shutdown and the span flush after the grace period
        assert spec["terminationGracePeriodSeconds"] >= pre_stop_s + grace + 10, role
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, role
    scheduler = tandem_container(tandem_deployments(objects)["scheduler"])
    assert scheduler["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep", (
        "the scheduler waits for its endpoint removal before it stops accepting"
    )


def test_the_scheduler_service_has_grpc_and_http_ports(overlay):
    _, objects = overlay
    service = by_kind(objects, "Service")["tandem-scheduler"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["grpc"]["port"], ports["http"]["port"]) == (50051, 8000)
    container = tandem_container(tandem_deployments(objects)["scheduler"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(objects, tandem_deployments(objects)["scheduler"])
    assert (named["grpc"], named["http"]) == (int(env["TANDEM_PORT"]), int(env["TANDEM_HTTP_PORT"]))
    for svc in by_kind(objects, "Service").values():
        deployment = next(
            d
            for d in by_kind(objects, "Deployment").values()
            if all(
                d["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in svc["spec"]["selector"].items()
            )
        )
        names = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)


# -- environment ------------------------------------------------------------------------------


def test_every_env_var_is_a_setting_of_its_service(overlay):
    """Each variable a Tandem container gets (envFrom ConfigMaps and env) is read by that service:
    a field of its config class or a telemetry variable; POD_* only carry the downward API into
    another variable's $(...)."""
    _, objects = overlay
    telemetry = telemetry_variables()
    for role, deployment in tandem_deployments(objects).items():
        known = settings_of(ROLES[role]) | telemetry
        container = tandem_container(deployment)
        env = env_of(objects, deployment)
        referenced = {
            name
            for item in container["env"]
            if "value" in item
            for name in re.findall(r"\$\((\w+)\)", item["value"])
        }
        for name in env:
            if name in DOWNWARD_HELPERS:
                item = next(i for i in container["env"] if i["name"] == name)
                assert "fieldRef" in item["valueFrom"] and name in referenced, (role, name)
                continue
            assert name in known, f"{role}: {name} is not a setting of {ROLES[role].__name__} or telemetry"
        assert not referenced - set(env), f"{role}: $(...) of an undefined variable"


def test_every_service_accepts_its_environment(overlay):
    """The values parse and pass the services' own start-up validation."""
    _, objects = overlay
    for role, deployment in tandem_deployments(objects).items():
        env = env_of(objects, deployment)
        fixed = {"role": role} if ROLES[role] is WorkerConfig else {}
        config = from_env(ROLES[role], env=env, overrides=fixed)
        telemetry = telemetry_from_env(f"tandem-{role}", env=env)
        assert telemetry.service_name == f"tandem-{role}"
        assert telemetry.resource_attributes["k8s.pod.name"].startswith(deployment["metadata"]["name"])
        assert telemetry.otlp_endpoint == "http://tandem-jaeger:4317"
        assert config.host == "0.0.0.0"


def test_workers_advertise_their_pod_ip_and_register_through_the_scheduler_service(overlay):
    _, objects = overlay
    for role in ("prefill", "decode"):
        deployment = tandem_deployments(objects)[role]
        env = env_of(objects, deployment, ip="10.9.8.7")
        assert env["TANDEM_ADVERTISE_ADDR"] == f"10.9.8.7:{env['TANDEM_PORT']}"
        pod_ip = next(i for i in tandem_container(deployment)["env"] if i["name"] == "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        host, _, port = env["TANDEM_SCHEDULER_ADDR"].rpartition(":")
        service = by_kind(objects, "Service")[host]
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        # headless, not-ready pods included: workers register with every scheduler pod, new ones too
        assert (service["spec"]["clusterIP"], service["spec"]["publishNotReadyAddresses"]) == ("None", True)
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == "scheduler"
        assert float(env["TANDEM_REGISTER_INTERVAL_S"]) <= 10, "a restarted scheduler gets workers back soon"
    scheduler = env_of(objects, tandem_deployments(objects)["scheduler"])
    assert "TANDEM_DECODE_ADDRS" not in scheduler and "TANDEM_PREFILL_ADDRS" not in scheduler
    decode = env_of(objects, tandem_deployments(objects)["decode"])
    assert decode["TANDEM_DRAFT_ADDR"] == "tandem-draft:50054"
    assert tandem_deployments(objects)["decode"]["spec"]["replicas"] >= 2


def test_collective_kv_rendezvous_port_is_declared_on_the_decode_pods(rendered):
    """gpu overlay: KV over NCCL, the decode pod's TCPStore on POD_IP:TANDEM_KV_RECEIVER_PORT."""
    decode = tandem_deployments(rendered["gpu"])["decode"]
    env = env_of(rendered["gpu"], decode)
    prefill = env_of(rendered["gpu"], tandem_deployments(rendered["gpu"])["prefill"])
    assert env["TANDEM_KV_TRANSPORT"] == prefill["TANDEM_KV_TRANSPORT"] == "collective"
    ports = {p["name"]: p["containerPort"] for p in tandem_container(decode)["ports"]}
    assert ports["kv-store"] == int(env["TANDEM_KV_RECEIVER_PORT"])
    cpu = env_of(rendered["cpu"], tandem_deployments(rendered["cpu"])["decode"])
    assert cpu["TANDEM_KV_TRANSPORT"] == "grpc"


def test_the_model_volume_is_mounted_read_only_everywhere(overlay):
    _, objects = overlay
    assert "tandem-models" in by_kind(objects, "PersistentVolumeClaim")
    for role, deployment in tandem_deployments(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "tandem-models"
        mount = next(m for m in tandem_container(deployment)["volumeMounts"] if m["name"] == "models")
        assert (mount["mountPath"], mount["readOnly"]) == ("/models", True)
        assert env_of(objects, deployment)["TANDEM_MODEL"].startswith("/models/"), role


# -- disruption, scaling, metrics -------------------------------------------------------------


def test_disruption_budgets_let_one_worker_drain_at_a_time(overlay):
    _, objects = overlay
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for role in ("prefill", "decode"):
        pdb = pdbs[f"tandem-{role}"]
        assert pdb["spec"]["maxUnavailable"] == 1
        labels = tandem_deployments(objects)[role]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def exported_metric_names() -> set[str]:
    metrics = Metrics("test")
    return {m.name for m in metrics.registry.collect()}


def adapter_metric_names() -> dict[str, set[str]]:
    """Metric names prometheus-adapter serves with deploy/k8s/autoscaling's rules: custom, external."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    exported = exported_metric_names()
    served: dict[str, set[str]] = {"custom": set(), "external": set()}
    for kind in served:
        for rule in values["rules"][kind]:
            series = [
                n for n in exported if re.search(rf"(?<![a-z_]){re.escape(n)}(?![a-z_])", rule["seriesQuery"])
            ]
            assert series, f"{kind} rule {rule['seriesQuery']!r} matches no exported metric"
            for name in series:
                if re.fullmatch(rule["name"]["matches"], name):
                    served[kind].add(
                        re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), name)
                    )
    return served


def test_each_worker_role_autoscales_on_tandem_metrics_served_by_the_adapter(overlay):
    _, objects = overlay
    served = adapter_metric_names()
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert set(hpas) == {"tandem-prefill", "tandem-decode"}
    for role in ("prefill", "decode"):
        hpa = hpas[f"tandem-{role}"]
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"tandem-{role}",
        }
        for metric in hpa["spec"]["metrics"]:
            kind = {"Pods": "custom", "External": "external"}[metric["type"]]
            spec = metric[metric["type"].lower()]
            assert spec["metric"]["name"] in served[kind], (role, spec["metric"]["name"])
            assert spec["target"]["type"] == "AverageValue"
    decode_metrics = {
        m[m["type"].lower()]["metric"]["name"] for m in hpas["tandem-decode"]["spec"]["metrics"]
    }
    assert decode_metrics == {"tandem_running_sequences", "tandem_scheduler_queue_depth"}
    running = next(
        m["pods"]["target"]["averageValue"]
        for m in hpas["tandem-decode"]["spec"]["metrics"]
        if m["type"] == "Pods"
    )
    decode_env = env_of(objects, tandem_deployments(objects)["decode"])
    assert int(running) < int(decode_env["TANDEM_MAX_NUM_SEQS"]), "scale before the batch is full"


def test_scale_down_drains_one_pod_at_a_time(overlay):
    """The HPA removes one pod per period, and a period outlasts a pod's whole termination:
    a drain (and the migration of what outlives it) ends before the next one starts."""
    _, objects = overlay
    for name, hpa in by_kind(objects, "HorizontalPodAutoscaler").items():
        target = by_kind(objects, "Deployment")[hpa["spec"]["scaleTargetRef"]["name"]]
        termination = target["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        down = hpa["spec"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 60, name
        assert down["selectPolicy"] == "Min"
        for policy in down["policies"]:
            assert policy == {"type": "Pods", "value": 1, "periodSeconds": policy["periodSeconds"]}, name
            assert policy["periodSeconds"] > termination, name
        assert hpa["spec"]["minReplicas"] >= 1


def test_prometheus_scrapes_each_service_on_its_metrics_port(overlay):
    _, objects = overlay
    for role, deployment in tandem_deployments(objects).items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        port = env_of(objects, deployment)["TANDEM_METRICS_PORT"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": port,
            "prometheus.io/path": "/metrics",
        }, role
        assert {"name": "metrics", "containerPort": int(port)} in tandem_container(deployment)["ports"], role


def test_dependent_variable_expansion_follows_kubernetes():
    assert expand("$(POD_IP):50053", {"POD_IP": "10.0.0.1"}) == "10.0.0.1:50053"
    assert expand("$$(POD_IP)", {"POD_IP": "10.0.0.1"}) == "$(POD_IP)"
    assert expand("$(UNSET):1", {}) == "$(UNSET):1"


def test_docs_describe_the_kubernetes_deployment():
    text = (Path(K8S_DIR).parents[1] / "docs" / "deploy.md").read_text()
    for needle in (
        "kubectl apply -k deploy/k8s/overlays/gpu",
        "NVIDIA device plugin",
        "prometheus-adapter",
        "TANDEM_KV_RECEIVER_PORT",
        "scale deployment/tandem-decode",
        "port-forward svc/tandem-jaeger",
    ):
        assert needle in text, needle


def test_one_patch_reaches_every_tandem_container_and_nothing_else(tmp_path):
    """How secrets (TLS certificates) get into every service: one patch on the container named
    `tandem`, targeting the Deployments labelled app.kubernetes.io/name=tandem."""
    (tmp_path / "secret-mount.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "any"},
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "tandem",
                                    "env": [{"name": "TANDEM_LOG_LEVEL", "value": "debug"}],
                                    "volumeMounts": [
                                        {"name": "certs", "mountPath": "/certs", "readOnly": True}
                                    ],
                                }
                            ],
                            "volumes": [{"name": "certs", "secret": {"secretName": "tandem-certs"}}],
                        }
                    }
                },
            }
        )
    )
    write_kustomization(tmp_path, resources=[K8S_DIR / "overlays" / "gpu"])
    doc = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    doc["patches"] = [
        {
            "path": "secret-mount.yaml",
            "target": {"kind": "Deployment", "labelSelector": "app.kubernetes.io/name=tandem"},
        }
    ]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    objects = render(tmp_path)
    for deployment in by_kind(objects, "Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        patched = any(v["name"] == "certs" for v in spec.get("volumes", []))
        assert patched == (deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "tandem")
        if patched:
            container = tandem_container(deployment)
            assert {"name": "certs", "mountPath": "/certs", "readOnly": True} in container["volumeMounts"]
            assert any(m["name"] == "models" for m in container["volumeMounts"]), "merged, not replaced"
            assert env_of(objects, deployment)["TANDEM_LOG_LEVEL"] == "debug"
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    assert (
        len(
            [
                d
                for d in by_kind(objects, "Deployment").values()
                if d["metadata"]["labels"]["app.kubernetes.io/name"] == "tandem"
            ]
        )
        == 4
    )


def test_models_from_hub_fills_each_pods_model_directory_before_it_starts(tmp_path, monkeypatch):
    """components/models-from-hub: an emptyDir at /models filled by an init container; its script
    runs here against a stand-in for huggingface_hub.snapshot_download that records its call."""
    import os
    import shlex
    import sys
    import types

    write_kustomization(
        tmp_path,
        resources=[K8S_DIR / "overlays" / "gpu"],
        components=[K8S_DIR / "components" / "models-from-hub"],
    )
    objects = render(tmp_path)
    assert "tandem-models" not in by_kind(objects, "PersistentVolumeClaim")
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    for role, deployment in tandem_deployments(objects).items():
        spec = deployment["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert set(volume) == {"name", "emptyDir"}, role
        (init,) = spec["initContainers"]
        assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
        script = init["command"][2]
        code = shlex.split(script[script.index("python -c") :])[2]
        calls = []
        hub = types.ModuleType("huggingface_hub")
        hub.snapshot_download = lambda repo, calls=calls, **kw: calls.append((repo, kw))
        monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
        init_env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
        monkeypatch.setattr(os, "environ", {**os.environ, **init_env})
        exec(compile(code, "fetch-model", "exec"), {})
        ((repo, kwargs),) = calls
        model_dir = env_of(objects, deployment)["TANDEM_MODEL"]
        assert (repo, kwargs["local_dir"]) == (init_env["HF_MODEL_REPO"], model_dir), role
        if role == "scheduler":  # the tokenizer is all it reads
            assert "tokenizer.json" in kwargs["allow_patterns"] and not any(
                p.endswith(".safetensors") for p in kwargs["allow_patterns"]
            )
        else:
            assert kwargs["allow_patterns"] is None, role
