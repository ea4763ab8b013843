"""What a first TensorRT-LLM deployment depends on, checked on the files: the image pinned to a
release tag, the driver it needs stated, the image's protobuf/grpc kept, UCX's interface set
in compose, and the first-run checklist and buffer formula in docs/deploy.md."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "deploy/compose/Dockerfile.trtllm").read_text()
DEPLOY = (ROOT / "docs/deploy.md").read_text()


def test_the_image_is_a_pinned_release_not_a_release_candidate():
    tag = re.search(r"ARG TRTLLM_IMAGE=nvcr\.io/nvidia/tensorrt-llm/release:(\S+)", DOCKERFILE).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{tag}: a release tag (no rc, no latest)"
    assert f"release:{tag}" in DEPLOY, "docs/deploy.md names the same image"


def test_the_driver_is_stated_in_the_dockerfile_and_the_checklist():
    for text in (DOCKERFILE, DEPLOY):
        assert re.search(r"R580|580\.\d+", text)


def test_the_images_protobuf_and_grpc_are_held_not_upgraded():
    pinned = re.search(r"grep -iE '\^\(([^)]*)\)=='", DOCKERFILE).group(1).split("|")
    for package in ("torch", "tensorrt[-_]llm", "protobuf", "grpcio"):
        assert package in pinned, package
    assert "-c /tmp/constraints.txt" in DOCKERFILE
    assert 'grpcio-tools${grpc:+==$grpc}' in DOCKERFILE, "protoc follows the image's grpcio"


def test_compose_sets_the_ucx_interface_and_can_log_the_transport():
    compose = yaml.safe_load((ROOT / "deploy/compose/docker-compose.yml").read_text())
    env = compose["x-worker-env"]
    assert env["TRTLLM_UCX_INTERFACE"] == "${TRTLLM_UCX_INTERFACE:-eth0}"
    assert "UCX_PROTO_INFO" in env
    assert "MPI" not in (ROOT / "deploy/compose/.env.example").read_text()


def test_deploy_doc_has_the_first_run_checklist_the_buffer_formula_and_ucx_transports():
    section = DEPLOY[DEPLOY.index("### First run on a GPU host") :]
    for needed in ("nvidia-smi", "Weights", "healthy", "UCX_PROTO_INFO=y", "cuda_ipc", "tcp", "ucx_info"):
        assert needed in section, needed
    assert "max_tokens_in_buffer x num_layers x 2" in DEPLOY
    assert "8192" in DEPLOY and "TRTLLM_UCX_INTERFACE" in DEPLOY
