"""On-demand DNS timings by flag: --dns-ttl, --dns-failure-ttl and --dns-timeout (or AMBIT_DNS_*) reach the
agent's resolver, today's values are the defaults, and a value that is no positive number of seconds is a usage
error naming the flag (or variable), not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.main import Agent, AgentConfig
from common import flags


def agent(tmp_path: Path, *argv: str) -> Agent:
    return Agent(flags.parse(AgentConfig, ["--no-capture", "--state-dir", str(tmp_path), *argv]))


def timings(a: Agent) -> tuple[float, float, float]:
    r = a.outbound.resolver
    return (r.ttl, r.failure_ttl, r.timeout)


async def test_defaults_are_30_s_for_answers_5_s_for_failures_and_a_5_s_lookup_timeout(tmp_path: Path) -> None:
    assert timings(agent(tmp_path)) == (30.0, 5.0, 5.0)


async def test_flags_and_environment_reach_the_outbound_resolver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert timings(agent(tmp_path, "--dns-ttl", "2.5", "--dns-failure-ttl", "0.5", "--dns-timeout", "1")) == (
        2.5,
        0.5,
        1.0,
    )
    monkeypatch.setenv("AMBIT_DNS_TTL", "300")
    monkeypatch.setenv("AMBIT_DNS_TIMEOUT", "0.25")
    assert timings(agent(tmp_path)) == (300.0, 5.0, 0.25)
    assert timings(agent(tmp_path, "--dns-ttl", "60")) == (60.0, 5.0, 0.25)  # the flag wins over the variable


@pytest.mark.parametrize("flag", ["--dns-ttl", "--dns-failure-ttl", "--dns-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf"])
def test_a_value_that_is_no_positive_number_of_seconds_is_a_usage_error_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        flags.parse(AgentConfig, [f"{flag}={value}"])  # "=": "-inf" would read as a flag
    assert exit_info.value.code == 2
    assert f"{flag} must be a positive number of seconds, got {float(value)}" in capsys.readouterr().err


def test_text_that_is_no_number_is_a_usage_error_as_a_flag_and_as_a_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        flags.parse(AgentConfig, ["--dns-timeout", "5s"])
    assert exit_info.value.code == 2
    assert "argument --dns-timeout: invalid float value: '5s'" in capsys.readouterr().err
    monkeypatch.setenv("AMBIT_DNS_FAILURE_TTL", "five")
    with pytest.raises(SystemExit) as exit_info:
        flags.parse(AgentConfig, [])
    assert exit_info.value.code == 2
    assert "AMBIT_DNS_FAILURE_TTL: invalid float value: 'five'" in capsys.readouterr().err
