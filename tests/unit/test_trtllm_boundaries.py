"""The engine boundary, checked on the source: services reach engines only through the engine
interface (shared/engine/interface.py), no service imports another service's modules, and the
engine packages never import grpc. A test fails on the first import or reach-through that
crosses a line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("scheduler", "prefill", "decode", "draft")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _py_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_no_service_imports_another_services_modules():
    crossings = []
    for service in SERVICES:
        for path in _py_files(f"services/{service}"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] not in (service, "common"):
                    crossings.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not crossings, crossings


def test_services_common_imports_no_service():
    crossings = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _py_files("services/common")
        for name in _imports(path)
        if name.split(".")[:2] != ["services", "common"] and name.startswith("services.")
    ]
    assert not crossings, crossings


def test_services_common_is_server_plumbing_only():
    assert not [p.name for p in _py_files("services/common") if "trtllm" in p.name]


def test_engine_packages_never_import_grpc_or_services():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for folder in ("shared/engine", "shared/engines")
        for path in _py_files(folder)
        for name in _imports(path)
        if name.split(".")[0] in ("grpc", "services") or name.startswith("shared.pb")
    ]
    assert not bad, bad


REACH_THROUGH = [
    (re.compile(r"aengine\.engine\b|\._aengine\.engine\b|\.engine\.(model_config|max_model_len|block_size|config)\b"),
     "reaches through the engine interface"),
    (re.compile(r"\.call\(\s*(lambda|_)"), "runs code on the engine thread (AsyncEngine.call)"),
    (re.compile(r"SimpleNamespace"), "builds an engine facade"),
]


def test_services_use_the_engine_only_through_its_interface():
    found = []
    for path in _py_files("services"):
        if path.parts[-3:-1] == ("services", "scheduler"):
            continue  # the scheduler has no engine
        text = path.read_text()
        for pattern, why in REACH_THROUGH:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line} {why}: {m.group(0)}")
    assert not found, found


def test_no_service_class_overrides_a_private_method_of_another_module():
    """A worker specialises by strategy (services/decode/handoff.py), not by overriding
    another module's private methods."""
    classes: dict[str, tuple[Path, set[str]]] = {}
    bases: list[tuple[Path, str, list[str]]] = []
    for path in _py_files("services"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
                classes[node.name] = (path, methods)
                bases.append((path, node.name, [b.id for b in node.bases if isinstance(b, ast.Name)]))
    overrides = []
    for path, name, base_names in bases:
        _, methods = classes[name]
        for base in base_names:
            if base not in classes or classes[base][0] == path:
                continue
            base_methods = classes[base][1]
            hooks = {m for m in base_methods if m.startswith("_") and not m.startswith("__")}
            # WorkerApp's documented subclass hooks are the one allowed kind
            allowed = {"_service_names", "_add_servicers", "_close", "_draft_client_factory"}
            overrides += [f"{name}.{m} overrides {base}.{m}" for m in (methods & hooks) - allowed]
    assert not overrides, overrides


def test_the_draft_delta_protocol_is_written_once():
    hits = [
        str(p.relative_to(ROOT))
        for folder in ("services", "shared")
        for p in _py_files(folder)
        if re.search(r"def _?common_prefix\(", p.read_text())
    ]
    assert hits == ["shared/draft_delta.py"], hits
