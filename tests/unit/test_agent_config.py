"""How the agent's flags reach its proxies (agent.main.Agent wiring, built without starting anything)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.addressing import AGENT_PORTS
from agent.main import Agent, AgentConfig, per_client_limit
from agent.outbound import route
from api.istio.workload import workload_pb2 as wpb
from common import flags


async def test_moved_listener_ports_are_refused_as_the_agents_own(tmp_path: Path) -> None:
    argv = ["--no-capture", "--state-dir", str(tmp_path), "--outbound-port", "16001", "--hbone-port", "16008"]
    agent = Agent(flags.parse(AgentConfig, argv))
    want = AGENT_PORTS | {16001, 16008}
    assert agent.outbound.config.own_ports == want
    assert agent.inbound.config.own_ports == want and agent.plaintext.config.own_ports == want
    src = wpb.Workload(uid="c//Pod/ns/a", name="a", namespace="ns", node="node1")
    # a connection to the moved outbound listener on the node's loopback would loop into the agent
    assert route(agent.store, "node1", src, ("127.0.0.1", 16001), agent.outbound.config).reason == "self_call"
    # another loopback port is refused too, as a forged destination (loopback_upstream), not as the agent's own
    assert route(agent.store, "node1", src, ("127.0.0.1", 16002), agent.outbound.config).reason == "loopback_upstream"


def test_the_per_client_connection_bound_defaults_to_a_sixteenth_of_the_open_files() -> None:
    assert per_client_limit(0, 1_048_576) == 65_536
    assert per_client_limit(0, 4096) == 1024  # never below 1024
    assert per_client_limit(50, 1_048_576) == 50
    with pytest.raises(SystemExit):
        flags.parse(AgentConfig, ["--max-connections-per-client", "-1"])
