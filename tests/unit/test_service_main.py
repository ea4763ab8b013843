"""Every service's entry point shortens the GIL switch interval (services/common/main.py): the
engine thread must not hold back the gRPC loop's callbacks for CPython's default 5 ms."""

from __future__ import annotations

import sys

import pytest

from services.common.main import GIL_SWITCH_INTERVAL_S, service_main
from shared.config import DraftConfig


def test_a_service_runs_with_the_short_gil_switch_interval(capsys):
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        with pytest.raises(SystemExit):
            service_main("draft", DraftConfig, "test", lambda: None, ["--help"])
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        assert GIL_SWITCH_INTERVAL_S <= 0.001
    finally:
        sys.setswitchinterval(before)
    assert "draft" in capsys.readouterr().out
