"""The shared `__main__` of the prefill and decode workers: config -> build -> serve."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.server import run_until_signal
from shared.config import ConfigError, WorkerConfig, add_cli_args, describe, from_env, telemetry_from_env


def worker_main(role: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{role}",
        description=f"Tandem {role} worker.",
        epilog="Settings (flags override the environment):\n" + describe(WorkerConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(parser, WorkerConfig, skip=("role",))
    args = parser.parse_args(argv)
    try:
        config = from_env(WorkerConfig, overrides={**vars(args), "role": role})
        telemetry_config = telemetry_from_env(f"tandem-{role}")
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2

    # Imported here: loading torch and the engine is slow, and --help should not wait for it.
    if role == "prefill":
        from services.prefill.app import PrefillApp as App
    else:
        from services.decode.app import DecodeApp as App

    from shared.telemetry import setup_telemetry

    async def run() -> None:
        app = App(config, telemetry=setup_telemetry(telemetry_config))  # loads the model
        await run_until_signal(app.start, app.stop)

    try:
        asyncio.run(run())
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0
