"""A fake of `docker compose` for tests: read, merge and interpolate compose files as Compose
does, then run the Tandem services as local processes with the command and environment their
containers would get.

Docker cannot run on the test machines, so this module reproduces the parts of Compose that
decide what a container runs (the Compose Specification, compose-spec/spec.md,
interpolation.md and merge.md):

- YAML with anchors and merge keys, plus the `!reset` and `!override` tags of the merge spec;
- override files merged into the base: mappings key by key, `command`/`entrypoint`/
  `healthcheck.test` replaced, other sequences appended without duplicates, `!reset` removing
  the key;
- interpolation of `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`,
  `${VAR?err}`, `${VAR:+alt}`, `${VAR+alt}` and `$$`, in values (not keys).

`ContainerProcess` then maps a container onto this host: service hostnames become 127.0.0.1,
paths under a bind mount's target become the mount's source, the image's WORKDIR becomes the
repository root, and `python` is this interpreter.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# -- YAML -------------------------------------------------------------------------------------


class Reset:
    """`!reset`: the key is removed from the merged model."""

    def __repr__(self) -> str:
        return "!reset"


@dataclass
class Override:
    """`!override value`: the value replaces the base's instead of merging with it."""

    value: Any


class _Loader(yaml.SafeLoader):
    pass


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_Loader.add_constructor("!reset", lambda loader, node: Reset())
_Loader.add_constructor("!override", lambda loader, node: Override(_construct_any(loader, node)))


def load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.load(f, Loader=_Loader)  # noqa: S506 - SafeLoader subclass with two tags
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a compose file must be a mapping")
    return data


# -- merge ------------------------------------------------------------------------------------

_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Merge `override` into `base` (neither is modified) as Compose merges override files."""
    if isinstance(override, Reset):
        return Reset()
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for k, v in override.items():
            merged[k] = merge(base[k], v, k) if k in base else _strip(v)
        return {k: v for k, v in merged.items() if not isinstance(v, Reset)}
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        return copy.deepcopy(base) + [_strip(v) for v in override if v not in base]
    return _strip(override)


def _strip(value: Any) -> Any:
    """A value without merge tags (what a key new to the base becomes)."""
    if isinstance(value, Override):
        return _strip(value.value)
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [_strip(v) for v in value if not isinstance(v, Reset)]
    return copy.deepcopy(value)


# -- interpolation ----------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


class InterpolationError(ValueError):
    pass


def interpolate_string(text: str, env: Mapping[str, str]) -> str:
    def replace(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("plain") or m.group("braced")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(replace, text)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Every string value (not key) of `value` with its variables substituted."""
    if isinstance(value, str):
        return interpolate_string(value, env)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def variables(value: Any) -> dict[str, str | None]:
    """Every variable the string values of `value` use, with its `:-`/`-` default (None: none)."""
    found: dict[str, str | None] = {}
    if isinstance(value, str):
        for m in _VAR.finditer(value):
            name = m.group("plain") or m.group("braced")
            if name:
                default = m.group("arg") if m.group("op") in (":-", "-") else None
                if found.get(name) is None:
                    found[name] = default
    elif isinstance(value, dict):
        for v in value.values():
            for k, d in variables(v).items():
                if found.get(k) is None:
                    found[k] = d
    elif isinstance(value, list):
        for v in value:
            for k, d in variables(v).items():
                if found.get(k) is None:
                    found[k] = d
    return found


def load_project(files: list[Path], env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model of `files` (base first), merged and interpolated with `env`."""
    model: Any = {}
    for path in files:
        model = merge(model, load_yaml(path))
    return interpolate(model, env)


# -- running a service as a local process -----------------------------------------------------


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment` (mapping or KEY=VALUE list) as strings, as the container sees it."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def dockerfile_env(dockerfile: Path) -> tuple[dict[str, str], str]:
    """The `ENV` settings and the last `WORKDIR` of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    workdir = "/"
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            continue
        instr, rest = parts[0].upper(), parts[1]
        if instr == "WORKDIR":
            workdir = rest.strip()
        elif instr == "ENV":
            for token in shlex.split(rest):
                if "=" in token:
                    k, v = token.split("=", 1)
                    env[k] = v
    return env, workdir


@dataclass
class ContainerProcess:
    """One compose service run on this host, its container's view mapped onto it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def from_service(
        cls,
        name: str,
        service: Mapping[str, Any],
        *,
        compose_dir: Path,
        repo_root: Path,
        service_names: list[str],
        port_map: Mapping[tuple[str, int], int] | None = None,
    ) -> ContainerProcess:
        """`port_map[(service, port)]`: the host port standing in for that container port, for
        services played by something else on this host (Jaeger by an OTLP receiver); the
        ports of the Tandem services are the same inside and outside (the test sets them)."""
        build = service.get("build") or {}
        image_env: dict[str, str] = {}
        workdir = "/"
        if build:
            context = (compose_dir / build.get("context", ".")).resolve()
            image_env, workdir = dockerfile_env(context / build.get("dockerfile", "Dockerfile"))
        env = {**image_env, **environment_of(service)}

        # bind mounts `source:target[:mode]`, longest target first
        mounts = {workdir: str(repo_root)}
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                mounts[target] = str((compose_dir / os.path.expanduser(source)).resolve())
        host_env = {k: _map_value(v, mounts, service_names, port_map or {}) for k, v in env.items()}

        command = service.get("command")
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        test = (service.get("healthcheck") or {}).get("test")
        return cls(
            name=name,
            argv=_host_argv(argv, mounts),
            env=host_env,
            cwd=Path(mounts[workdir]),
            healthcheck=_host_argv(test[1:], mounts) if test and test[0] == "CMD" else None,
        )

    def start(self, log_path: Path) -> subprocess.Popen:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **self.env}
        log = open(log_path, "w")  # noqa: SIM115 - closed by the process's end
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self.proc

    def healthy(self) -> bool:
        """Run the service's compose health check command, as Docker would inside the container."""
        if self.healthcheck is None:
            return True
        env = {"PATH": os.environ.get("PATH", ""), **self.env}
        done = subprocess.run(self.healthcheck, cwd=self.cwd, env=env, capture_output=True, timeout=30)
        return done.returncode == 0


def _map_value(
    value: str,
    mounts: Mapping[str, str],
    service_names: list[str],
    port_map: Mapping[tuple[str, int], int] | None = None,
) -> str:
    for name in service_names:  # `decode:50053`, `http://jaeger:4317`

        def to_loopback(m: re.Match, name: str = name) -> str:
            port = int(m.group(1))
            return f"127.0.0.1:{(port_map or {}).get((name, port), port)}"

        value = re.sub(rf"(?<![\w.-]){re.escape(name)}:(\d+)", to_loopback, value)
    for target in sorted(mounts, key=len, reverse=True):
        if target != "/" and (value == target or value.startswith(target.rstrip("/") + "/")):
            return mounts[target] + value[len(target.rstrip("/")) :]
    return value


def _host_argv(argv: list[str], mounts: Mapping[str, str]) -> list[str]:
    if argv and argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    return [_map_value(a, mounts, []) for a in argv]
