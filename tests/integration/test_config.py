"""Service configuration: environment, flag overrides, and errors that name the variable."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shared.config import (
    ConfigError,
    SchedulerConfig,
    WorkerConfig,
    add_cli_args,
    from_env,
    telemetry_from_env,
)

from .cluster import ROOT_DIR


def test_environment_then_flags():
    env = {"TANDEM_MODEL": "/m", "TANDEM_DECODE_ADDRS": "a:1, b:2", "TANDEM_PORT": "6000"}
    parser = argparse.ArgumentParser()
    add_cli_args(parser, SchedulerConfig)
    args = parser.parse_args(["--port", "7000", "--disagg-min-tokens", "64"])
    config = from_env(SchedulerConfig, env, overrides=vars(args))
    assert (config.port, config.disagg_min_tokens, config.decode_addrs) == (7000, 64, ["a:1", "b:2"])


def test_defaults_per_role():
    assert from_env(WorkerConfig, {"TANDEM_MODEL": "/m"}, {"role": "prefill"}).port == 50052
    worker = from_env(WorkerConfig, {"TANDEM_MODEL": "/m", "TANDEM_NUM_BLOCKS": "12"}, {"role": "decode"})
    assert worker.port == 50053 and worker.kv_transport == "grpc"
    assert worker.engine_kwargs()["num_blocks"] == 12


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "TANDEM_MODEL: required"),
        ({"TANDEM_PORT": "http"}, "TANDEM_PORT: expected an integer"),
        ({"TANDEM_KV_TRANSPORT": "tcp"}, "TANDEM_KV_TRANSPORT: expected one of 'grpc', 'collective'"),
        ({"TANDEM_PREFIX_CACHING": "maybe"}, "TANDEM_PREFIX_CACHING: expected true or false"),
        ({"TANDEM_NUM_BLOCKS": "0"}, "TANDEM_NUM_BLOCKS: must be >= 1"),
        ({"TANDEM_SCHEDULER_ADDR": "nohost"}, "TANDEM_SCHEDULER_ADDR: expected host:port"),
        ({"TANDEM_DEVICE": "tpu"}, "TANDEM_DEVICE: expected cpu, cuda or cuda:N"),
    ],
)
def test_bad_settings_name_their_variable(env, message):
    env = {"TANDEM_MODEL": "/m", **env} if "TANDEM_MODEL" not in message else env
    with pytest.raises(ConfigError, match=message):
        from_env(WorkerConfig, env)


def test_telemetry_settings_errors_are_config_errors():
    with pytest.raises(ConfigError, match="TANDEM_METRICS_PORT"):
        telemetry_from_env("tandem-decode", {"TANDEM_METRICS_PORT": "x"})


def test_entry_points_report_bad_configuration_and_exit_2(tmp_path):
    for module, env in [
        ("services.scheduler", {"TANDEM_MODEL": str(tmp_path / "missing")}),
        ("services.decode", {"TANDEM_MODEL": str(tmp_path), "TANDEM_KV_TRANSPORT": "carrier-pigeon"}),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", module],
            cwd=ROOT_DIR,
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("configuration error: TANDEM_")
