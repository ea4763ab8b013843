"""`python -m services.scheduler`: config (env, then flags) -> build -> serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.server import run_until_signal
from shared.config import ConfigError, SchedulerConfig, add_cli_args, describe, from_env, telemetry_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.scheduler",
        description="Tandem scheduler: the public Generate API in front of decode and prefill workers.",
        epilog="Settings (flags override the environment):\n" + describe(SchedulerConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(parser, SchedulerConfig)
    args = parser.parse_args(argv)
    try:
        config = from_env(SchedulerConfig, overrides=vars(args))
        telemetry_config = telemetry_from_env("tandem-scheduler")
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2

    from shared.telemetry import setup_telemetry

    from .app import SchedulerApp

    async def run() -> None:
        app = SchedulerApp(config, telemetry=setup_telemetry(telemetry_config))
        await run_until_signal(app.start, app.stop)

    try:
        asyncio.run(run())
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
