"""common.flags: flags over AMBIT_* variables over defaults; a value the config refuses is a usage error."""

from __future__ import annotations

import pytest

from agent.main import AgentConfig
from common import flags


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIT_EARLY_DATA", "100")
    assert flags.parse(AgentConfig, []).early_data == 100
    assert flags.parse(AgentConfig, ["--early-data", "0"]).early_data == 0


def test_refused_value_is_a_usage_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        flags.parse(AgentConfig, ["--early-data", "-1"])
    assert exit_info.value.code == 2
    assert "--early-data must be 0 to 65536 bytes, got -1" in capsys.readouterr().err
