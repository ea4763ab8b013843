"""The shared `__main__` of the prefill and decode workers: config -> build -> serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.server import run_until_signal
from shared.config import ConfigError, WorkerConfig, add_cli_args, describe, from_env


def worker_main(role: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{role}",
        description=f"Tandem {role} worker.",
        epilog="Settings (flags override the environment):\n" + describe(WorkerConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(parser, WorkerConfig, skip=("role",))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = from_env(WorkerConfig, overrides={**vars(args), "role": role})
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2

    # Imported here: loading torch and the engine is slow, and --help should not wait for it.
    if role == "prefill":
        from services.prefill.app import PrefillApp as App
    else:
        from services.decode.app import DecodeApp as App

    async def run() -> None:
        app = App(config)  # loads the model
        await run_until_signal(app.start, app.stop)

    try:
        asyncio.run(run())
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0
