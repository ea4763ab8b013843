"""`python -m services.draft`: config (env, then flags) -> build -> serve until SIGTERM."""

import sys

from services.common.main import service_main
from shared.config import DraftConfig


def _app() -> type:
    from services.draft.app import DraftApp

    return DraftApp


if __name__ == "__main__":
    sys.exit(
        service_main(
            "draft",
            DraftConfig,
            "Tandem draft service: proposes tokens for the decode workers' speculative decoding.",
            _app,
            sys.argv[1:],
        )
    )
