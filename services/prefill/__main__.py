"""`python -m services.prefill`: config (env, then flags) -> build -> serve until SIGTERM."""

import sys

from services.common.main import service_main
from shared.config import WorkerConfig


def _app() -> type:
    from services.prefill.app import PrefillApp

    return PrefillApp


if __name__ == "__main__":
    sys.exit(
        service_main(
            "prefill", WorkerConfig, "Tandem prefill worker.", _app, sys.argv[1:], fixed={"role": "prefill"}
        )
    )
