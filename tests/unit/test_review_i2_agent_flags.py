"""The agent's renewal floor is a flag (and AMBIT_ variable) like its other identity settings, and reaches the
certificate manager."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.main import Agent, AgentConfig
from common import flags


def agent(tmp_path: Path, *argv: str) -> Agent:
    return Agent(flags.parse(AgentConfig, ["--no-capture", "--state-dir", str(tmp_path), *argv]))


async def test_the_floor_defaults_to_a_sixteenth_of_the_ttl(tmp_path: Path) -> None:
    assert agent(tmp_path).certs.min_refresh_interval == 24 * 3600 / 16
    assert agent(tmp_path, "--cert-ttl", "3200").certs.min_refresh_interval == 200


async def test_the_floor_is_set_by_flag_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent(tmp_path, "--cert-min-refresh", "600").certs.min_refresh_interval == 600
    monkeypatch.setenv("AMBIT_CERT_MIN_REFRESH", "0")
    assert agent(tmp_path).certs.min_refresh_interval == 0
    assert agent(tmp_path, "--cert-min-refresh", "30.5").certs.min_refresh_interval == 30.5


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "43201"])
def test_a_floor_outside_zero_to_half_the_ttl_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        flags.parse(AgentConfig, ["--cert-min-refresh", value])
    assert exit_info.value.code == 2
    assert "--cert-min-refresh must be 0 to half of --cert-ttl (43200) seconds" in capsys.readouterr().err
