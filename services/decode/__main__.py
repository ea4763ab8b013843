"""`python -m services.decode`: config (env, then flags) -> build -> serve until SIGTERM."""

from __future__ import annotations

import sys

from services.common.worker_main import worker_main

if __name__ == "__main__":
    sys.exit(worker_main("decode", sys.argv[1:]))
