"""`make soak` in small: the whole stack under load while each worker kind is killed once.

The full run (`make soak`, ten minutes) is recorded in docs/reliability.md; this keeps the tool
and its promises working: no wrong output, no leaked block, no hung request after a prefill
worker, a decode worker and the draft were each SIGKILLed and restarted mid-load.
"""

from __future__ import annotations

import json

import pytest

from tools import soak

pytestmark = pytest.mark.slow


def test_soak_short_run_with_every_worker_killed(tmp_path):
    out = tmp_path / "soak.json"
    rc = soak.main(
        [
            "--duration",
            "10",
            "--concurrency",
            "4",
            "--kill-interval",
            "2",
            "4",
            "--min-rounds",
            "1",
            "--prompts",
            "8",
            "--max-tokens",
            "32",
            "--hang-s",
            "90",
            "--log-dir",
            str(tmp_path / "logs"),
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0, soak.render(report) + "\n" + "\n".join(report["examples"])
    assert set(report["kills"]) == {"prefill", "decode-a", "decode-b", "draft"}
    assert report["completed"] > 0 and report["checked"] > 0
    assert report["wrong"] == report["leaked_blocks"] == report["hung"] == report["failed_unclean"] == 0
