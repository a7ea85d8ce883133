"""Operating a mesh lab: agents stopped, restarted and torn down while pods hold connections.

One lab for the module (bench/topology/mesh: client and server-local on node1, server on node2). Stopping an agent
must wait for its drain, or the connections it was still carrying leave no access-log line; an agent restarted
without its xDS state file must not refuse the connections the previous agent's pinned filters steer to it.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from lab.mesh import wait_ready
from lab.observe import agent_log
from tests.support.mesh import connect, connect_through_restart, echo_through

from .conftest import LabFactory

TOPOLOGY = Path(__file__).resolve().parents[2] / "bench" / "topology" / "mesh"
ECHO = 9000
SERVER = "10.71.2.10"  # bench-mesh/server on node2


@pytest.fixture(scope="module")
def mesh(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(TOPOLOGY, name=f"ambit-op{secrets.token_hex(2)}", mesh=True)
    try:
        yield lab
    finally:
        lab.down()


def _open_through(lab: Lab) -> socket.socket:
    """A connection from bench-mesh/client to the server's echo port that has carried a byte each way and stays
    open: the agents hold it until their drain ends."""
    sock = connect(lab, "client", SERVER, ECHO, timeout=10)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    return sock


def _records_of(log: list[dict[str, Any]], src: str) -> list[dict[str, Any]]:
    return [r for r in log if r.get("src.addr") == src and r.get("direction") == "outbound"]


def _src(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def test_a_restart_waits_for_the_drain_and_keeps_the_access_log_line(mesh: Lab) -> None:
    """The connection outlives the agent's drain (5 s), so the agent cuts it and logs it as it exits. The lab used
    to SIGKILL agents 3 s after SIGTERM: the line was never written."""
    with _open_through(mesh) as sock:
        src = _src(sock)
        assert not _records_of(agent_log(mesh, "node1"), src), "still open: nothing logged yet"
        new = mesh.restart("agent-node1")
    node = mesh.node("node1")
    wait_ready(node.netns, node.ip, 15021, new)
    found = _records_of(agent_log(mesh, "node1"), src)
    assert len(found) == 1, f"expected one access-log line for {src} on node1, got {found}"
    assert found[0]["error"] == "cancelled", found[0]


def _restart_without_state(lab: Lab, agent: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Kill ``agent`` (-9), delete its xDS state file, start it again and open a connection every 50 ms from
    before the new process exists until it reports ready. Returns each connection's outcome and the new agent's log
    lines (all of them)."""
    node = lab.node(agent.removeprefix("agent-"))
    state_file = lab.state_dir / "agents" / node.name / "xds-state.pb"
    assert state_file.exists(), "the agent must have saved its state: the test deletes it"
    logged_before = len(agent_log(lab, node.name))

    outcomes = connect_through_restart(lab, agent, (SERVER, ECHO), while_down=state_file.unlink)
    return outcomes, agent_log(lab, node.name)[logged_before:]


@pytest.mark.parametrize("agent", ["agent-node1", "agent-node2"])
def test_an_agent_restarted_without_its_state_file_holds_connections_for_its_config(mesh: Lab, agent: str) -> None:
    """Source side (node1, outbound capture) and destination side (node2, HBONE capture). The previous agent's
    pinned filters steer connections to the new agent's listeners as soon as they exist; with no state file the
    agent knew no workload until the controller answered (after the programs compiled) and refused every one of
    them (43 of 44 failed on node1 before, 35 of 36 on node2)."""
    assert asyncio.run(echo_through(mesh, "client", (SERVER, ECHO), b"warm")) == "ok"
    outcomes, log = _restart_without_state(mesh, agent)
    failed = [o for o in outcomes if o != "ok"]
    refused = [r for r in log if r.get("error") in ("unknown_source", "unknown_destination")]
    problems = [r for r in log if r.get("level") in ("warning", "error")][:5]
    assert len(outcomes) > 10, "connections must have been attempted while the agent started"
    assert not failed, f"{len(failed)} of {len(outcomes)} failed across the restart: {failed[:3]}; agent: {problems}"
    assert not refused, f"the restarted agent refused connections for want of config: {refused[:2]}"
    assert asyncio.run(echo_through(mesh, "client", (SERVER, ECHO), b"after")) == "ok"


def test_lab_down_waits_for_the_drain_and_keeps_the_access_log_line(lab_factory: LabFactory) -> None:
    """The same through `lab down` (every process stopped at once), with the logs kept to read them afterwards."""
    lab = lab_factory(TOPOLOGY, mesh=True)
    with _open_through(lab) as sock:
        src = _src(sock)
        lab.down(keep_logs=True)
    log = agent_log(lab, "node1")  # the record in memory still names the kept log file
    found = _records_of(log, src)
    assert len(found) == 1, f"expected one access-log line for {src} on node1, got {found}; log ends {log[-8:]}"
    assert log[-1].get("msg") == "stopped", f"the agent must have finished its shutdown: {log[-1]}"
