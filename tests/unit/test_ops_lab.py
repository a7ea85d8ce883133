"""The lab's agent drain time: the lab must wait as long as its agents drain, whichever way that was set."""

from __future__ import annotations

import dataclasses

import pytest

from agent.main import AgentConfig
from lab import LabConfigError, mesh


def test_the_labs_default_is_the_agents_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMBIT_DRAIN_SECONDS", raising=False)
    (field,) = [f for f in dataclasses.fields(AgentConfig) if f.name == "drain_seconds"]
    assert mesh.drain_seconds() == mesh.DRAIN_SECONDS == field.default


def test_the_agents_own_environment_variable_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agents would read AMBIT_DRAIN_SECONDS themselves; the lab passes the same value as a flag."""
    monkeypatch.setenv("AMBIT_DRAIN_SECONDS", "12.5")
    assert mesh.drain_seconds() == 12.5
    assert mesh.drain_seconds(2.0) == 2.0, "an explicit value wins"
    argv = mesh.agent_argv("n1", "c:1", "/s", "/t", "/r", "eth0", "i", mesh.drain_seconds())
    assert argv[argv.index("--drain-seconds") + 1] == "12.5"


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf"])
def test_a_bad_drain_time_is_refused_naming_it(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIT_DRAIN_SECONDS", raw)
    with pytest.raises(LabConfigError, match=f"AMBIT_DRAIN_SECONDS: .* got '{raw}'"):
        mesh.drain_seconds()
    with pytest.raises(LabConfigError, match="drain_seconds: "):
        mesh.drain_seconds(-1.0)


def test_agents_look_for_pod_namespaces_of_their_own_lab_only() -> None:
    """Labs share /run/netns and reuse pod addresses: an agent must never connect from another lab's pod."""
    argv = mesh.agent_argv("n1", "c:1", "/s", "/t", "/r", "eth0", "i", pod_netns_prefix="lab7-pod-")
    assert argv[argv.index("--pod-netns-dirs") + 1] == "/run/netns"
    assert argv[argv.index("--pod-netns-prefix") + 1] == "lab7-pod-"
    off = mesh.agent_argv("n1", "c:1", "/s", "/t", "/r", "eth0", "i")
    assert off[off.index("--pod-netns-dirs") + 1] == "" and "--pod-netns-prefix" not in off
