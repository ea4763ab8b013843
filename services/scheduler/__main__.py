"""`python -m services.scheduler`: config (env, then flags) -> build -> serve until SIGTERM."""

import sys

from services.common.main import service_main
from shared.config import SchedulerConfig


def _app() -> type:
    from services.scheduler.app import SchedulerApp

    return SchedulerApp


if __name__ == "__main__":
    sys.exit(
        service_main(
            "scheduler",
            SchedulerConfig,
            "Tandem scheduler: the public Generate API in front of decode and prefill workers.",
            _app,
            sys.argv[1:],
        )
    )
