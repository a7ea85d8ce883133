"""(b) Ambit cross-node and (c) Ambit same-node, in the mesh lab (controller + one agent per node).

The client pod dials the server pod's own address: the agents capture it with eBPF, nothing is configured in the
pods. Before a configuration is measured, a probe proves the path is what its name says: while a connection is
open, the client node's netns must hold a socket for it (the agent captured it). A mesh that passed traffic through
uncaptured would otherwise be reported as Ambit numbers.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from bench import procs
from bench.cpu import pin_all_threads
from bench.drivers.base import DriverUnavailable, Endpoint, Proxy
from bench.labs import ECHO_PORT, IPERF_PORT, BenchLabs, LabSite, Pinning
from bench.tools import Tools
from lab import NodeInfo, PodInfo


def agent_pids(site: LabSite) -> dict[str, int]:
    """Live agent process per node name, from the lab's process records."""
    by_netns = {node.netns: name for name, node in site.lab.nodes.items()}
    found: dict[str, int] = {}
    for record, alive in site.lab.processes():
        if record.role == "agent" and alive and record.netns in by_netns:
            found[by_netns[record.netns]] = record.pid
    return found


def _sockets_on_port(netns: str, port: int) -> list[str]:
    out = procs.run(["ss", "-Htn", "state", "established", f"( sport = :{port} or dport = :{port} )"], netns=netns)
    return [line for line in out.stdout.splitlines() if line.strip()]


def probe_capture(tools: Tools, client: PodInfo, node_netns: str, target_ip: str) -> list[str]:
    """Hold one echo connection open from the client pod and list the client node's sockets for it.

    Raises DriverUnavailable when the echo itself fails: then the data path is broken, not slow.
    """
    argv = [str(tools.pingpong), target_ip, str(ECHO_PORT), "1", "100000000", "10", "persistent", "1.0"]
    with subprocess.Popen(
        procs.in_netns(client.netns, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as probe:
        time.sleep(0.4)
        seen = _sockets_on_port(node_netns, ECHO_PORT)
        _, err = probe.communicate(timeout=30)
    if probe.returncode != 0:
        raise DriverUnavailable(f"echo from {client.key} to {target_ip}:{ECHO_PORT} failed: {err.strip()}")
    return seen


def uplink_programs(node: NodeInfo) -> str:
    out = procs.run(["bpftool", "net", "show", "dev", node.uplink], netns=node.netns)
    return out.stdout if out.returncode == 0 else ""


@dataclass(frozen=True)
class AmbitPath:
    """Which pods talk; the agent must be in the path (captured)."""

    name: str
    title: str
    description: str
    client_key: str
    server_key: str


AMBIT_PATHS = (
    AmbitPath(
        "ambit-cross",
        "Ambit cross-node",
        "enrolled client pod (node1) -> eBPF capture -> agent node1 -> HBONE (HTTP/2 CONNECT, mTLS) -> "
        "agent node2 -> server pod (node2)",
        "bench-mesh/client",
        "bench-mesh/server",
    ),
    AmbitPath(
        "ambit-same",
        "Ambit same-node",
        "enrolled client pod -> eBPF capture -> agent node1 (same-node fast path) -> enrolled server pod on node1",
        "bench-mesh/client",
        "bench-mesh/server-local",
    ),
)


class AmbitConfig:
    def __init__(self, path: AmbitPath, labs: BenchLabs, tools: Tools, pinning: Pinning) -> None:
        self.path = path
        self.name = path.name
        self.title = path.title
        self.description = path.description
        self._labs = labs
        self._tools = tools
        self._pinning = pinning

    def prepare(self) -> Endpoint:
        site = self._labs.get("mesh")
        client, server = site.pod(self.path.client_key), site.pod(self.path.server_key)
        agents = agent_pids(site)
        missing = [n for n in site.lab.nodes if n not in agents]
        if missing:
            raise DriverUnavailable(f"no live ambit-agent on {', '.join(missing)} (see the mesh lab's agent logs)")
        for node_name, pid in agents.items():
            cpus = self._pinning.for_node(node_name)
            if cpus:
                pin_all_threads(pid, set(cpus))
        client_node = site.node(client.node)
        seen = probe_capture(self._tools, client, client_node.netns, server.ip)
        if not seen:
            raise DriverUnavailable(
                f"traffic {client.key} -> {server.key} was not captured: no socket for port {ECHO_PORT} in "
                f"{client_node.netns} while a connection was open (pods not enrolled, or redirect not attached)"
            )
        involved = {client.node, server.node}
        return Endpoint(
            client_netns=client.netns,
            echo=(server.ip, ECHO_PORT),
            iperf=(server.ip, IPERF_PORT),
            proxies=[Proxy(f"agent-{n}", agents[n]) for n in sorted(involved)],
            client_cpus=self._pinning.for_node(client.node),
            notes=[f"captured: {seen[0]}", f"agents (CPU charged): {', '.join(sorted(involved))}"],
        )

    def close(self) -> None:
        """The agents belong to the mesh lab, which BenchLabs takes down."""
