"""The `tandem` command (a console script installed with Tandem):

    tandem serve [--model DIR] [--dtype ...] [--max-model-len N] [--kv-cache-memory 2GiB] ...
                                         the services as local processes (what `make run` does)
    tandem generate "def fib(n):" [--max-tokens 64] [--addr localhost:50051] ...
                                         stream one completion from a running Tandem (the client)
    tandem bench engine|serve ...        benchmarks (what `make bench-engine` / `make bench-serve` run)
    tandem traces show|list ...          read a TANDEM_TRACE_FILE span file

`tandem <command> --help` lists a command's options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _serve(argv: list[str]) -> int:
    from tools import run_local

    return run_local.main(argv, prog="tandem serve")


def _generate(argv: list[str]) -> int:
    from tools import client

    return client.main(argv, prog="tandem generate")


def _bench(argv: list[str]) -> int:
    from tools.bench.__main__ import main

    return main(argv, prog="tandem bench")


def _traces(argv: list[str]) -> int:
    from tools import traces

    return traces.main(argv, prog="tandem traces")


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": _serve,
    "generate": _generate,
    "bench": _bench,
    "traces": _traces,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tandem: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
