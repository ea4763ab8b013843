"""`python -m services.decode`: config (env, then flags) -> build -> serve until SIGTERM."""

import sys

from services.common.main import service_main
from shared.config import WorkerConfig


def _app() -> type:
    from services.decode.app import DecodeApp

    return DecodeApp


if __name__ == "__main__":
    sys.exit(
        service_main(
            "decode", WorkerConfig, "Tandem decode worker.", _app, sys.argv[1:], fixed={"role": "decode"}
        )
    )
