"""`python -m services.draft`: config (env, then flags) -> build -> serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.server import run_until_signal
from shared.config import ConfigError, DraftConfig, add_cli_args, describe, from_env, telemetry_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.draft",
        description="Tandem draft service: proposes tokens for the decode workers' speculative decoding.",
        epilog="Settings (flags override the environment):\n" + describe(DraftConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(parser, DraftConfig)
    args = parser.parse_args(argv)
    try:
        config = from_env(DraftConfig, overrides=vars(args))
        telemetry_config = telemetry_from_env("tandem-draft")
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2

    # Imported here: loading torch and the engine is slow, and --help should not wait for it.
    from shared.telemetry import setup_telemetry

    from .app import DraftApp

    async def run() -> None:
        app = DraftApp(config, telemetry=setup_telemetry(telemetry_config))  # loads the model
        await run_until_signal(app.start, app.stop)

    try:
        asyncio.run(run())
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
