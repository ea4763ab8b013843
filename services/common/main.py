"""The `__main__` of every service: config (environment, then flags) -> build -> serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from services.common.server import run_until_signal
from shared.config import ConfigError, add_cli_args, describe, from_env, telemetry_from_env

# How long a Python thread may hold the GIL while another waits for it. A worker runs its
# engine on a thread beside the asyncio loop that serves gRPC; at CPython's default (5 ms) a
# busy engine thread delays the loop's callbacks, and a reply the engine thread waits for
# (the draft call of a speculative step), by up to 5 ms each. Measured on the demo pair at
# concurrency 1: a draft call of k = 4 took 9.8 ms at 5 ms and 6.4-7.0 ms at 0.5 ms (its
# compute: 3.6 ms), and speculation's TPOT speedup went from 1.21x to 1.37x (make bench-spec).
GIL_SWITCH_INTERVAL_S = 0.0005


def service_main(
    role: str,
    config_cls: type,
    description: str,
    load_app: Callable[[], type],
    argv: list[str],
    fixed: dict[str, Any] | None = None,
) -> int:
    """`load_app` imports the service's App class only once the configuration is valid:
    loading torch and the engine is slow, and `--help` should not wait for it. `fixed`
    settings are set by the entry point (e.g. a worker's role), not by flags."""
    fixed = fixed or {}
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{role}",
        description=description,
        epilog="Settings (flags override the environment):\n" + describe(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cli_args(parser, config_cls, skip=tuple(fixed))
    args = parser.parse_args(argv)
    try:
        config = from_env(config_cls, overrides={**vars(args), **fixed})
        telemetry_config = telemetry_from_env(f"tandem-{role}", host=config.host)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2

    from shared.telemetry import setup_telemetry

    app_cls = load_app()

    async def run() -> None:
        app = app_cls(config, telemetry=setup_telemetry(telemetry_config))  # workers load the model here
        await run_until_signal(app.start, app.stop)

    try:
        asyncio.run(run())
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    # Stopped and flushed (spans, metrics, logs). Skip the interpreter's own teardown, which
    # takes seconds freeing the model and KV cache object by object and would make a
    # container runtime's stop timeout kill the process.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
