"""`python -m services.prefill`: config (env, then flags) -> build -> serve until SIGTERM."""

from __future__ import annotations

import sys

from services.common.worker_main import worker_main

if __name__ == "__main__":
    sys.exit(worker_main("prefill", sys.argv[1:]))
