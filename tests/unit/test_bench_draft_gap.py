"""`python -m tools.bench draft-gap`: the draft's proposal call timed after each kind of gap."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tools.bench import draft_gap

DEMO = Path(__file__).resolve().parents[2] / "models" / "tandem-demo-code" / "target"


@pytest.mark.skipif(not (DEMO.parent / "draft" / "config.json").is_file(), reason="the demo pair is not here")
def test_every_gap_kind_is_timed_and_reported(tmp_path):
    parser = argparse.ArgumentParser()
    draft_gap.add_parser(parser.add_subparsers())
    args = parser.parse_args(["draft-gap", "--model", str(DEMO), "--rounds", "1", "--calls", "3", "--gap-ms", "0.5",
                              "--out-dir", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    result = json.loads((tmp_path / "draft-gap.json").read_text())
    assert set(result["call_ms"]) == set(draft_gap.GAPS)
    assert all(ms > 0 for ms in result["call_ms"].values())
    # each call's forwards: the new tokens, then one per further proposal (k = 4)
    assert all(len(f) == 4 and all(ms > 0 for ms in f) for f in result["forward_ms"].values())
    text = (tmp_path / "draft-gap.md").read_text()
    assert all(f"| {kind} |" in text for kind in draft_gap.GAPS)


def test_a_target_without_a_draft_beside_it_is_refused(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    draft_gap.add_parser(parser.add_subparsers())
    (tmp_path / "target").mkdir()
    args = parser.parse_args(
        ["draft-gap", "--model", str(tmp_path / "target"), "--out-dir", str(tmp_path / "out")]
    )
    assert args.func(args) == 1
    assert "no draft model" in capsys.readouterr().out
