"""The bench's labs: built from bench/topology/, with the backends (echo server, iperf3 server) in the server pods.

Three labs, because a no-mesh baseline must not cross Ambit's uplink program: "plain" (no mesh) hosts the baselines
(cross-node and same-node) and the reference proxy pairs; "attach" (the same topology) carries the capture program
with nothing enrolled; "mesh" (controller + agents) hosts the enrolled Ambit configurations. Each is brought up on
first use, so a run with --only nomesh never starts a mesh, and a lab that fails to come up fails only the
configurations that need it, with the lab's own error as the reason.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.drivers.base import DriverUnavailable
from bench.procs import ProcessGroup
from bench.tools import Tools
from lab import Lab, LabError, NodeInfo, PodInfo
from lab.state import state_dir

TOPOLOGY = Path(__file__).resolve().parent / "topology"
ECHO_PORT = 19000
IPERF_PORT = 5201

# Pods that run the backends, per lab ("namespace/name").
SERVER_PODS = {
    "plain": ("bench/server", "bench/server-local"),
    "attach": ("bench/server",),
    "mesh": ("bench-mesh/server", "bench-mesh/server-local"),
}
TOPOLOGY_DIRS = {"plain": "plain", "attach": "plain", "mesh": "mesh"}
MESH_KINDS = {"mesh", "rss"}  # "rss": the 100-workload lab of the agent memory measure (generated topology)


@dataclass(frozen=True)
class Pinning:
    """--pin: one core per node side. The client node (its pods and proxy) gets CPU 0, the server node CPU 1.

    On a 2-core machine this models "each node has its own core", so the two sides do not steal from each other.
    Same-node configurations keep this rule: the client pod, its node's agent and the local server pod all share
    CPU 0, as they would share one node's core.
    """

    enabled: bool

    def for_node(self, node: str) -> list[int] | None:
        if not self.enabled:
            return None
        return [0] if node == "node1" else [1]


class LabSite:
    """One running lab plus the backends the bench started in it."""

    def __init__(self, kind: str, lab: Lab) -> None:
        self.kind = kind
        self.lab = lab

    def pod(self, key: str) -> PodInfo:
        return self.lab.pod(key)

    def node(self, name: str) -> NodeInfo:
        return self.lab.node(name)


CONNTRACK_TABLE = (
    "table inet bench_conntrack {\n chain prerouting {\n  type filter hook prerouting priority 0;\n"
    "  ct state invalid counter\n }\n}\n"
)
"""A rule that only makes netfilter track connections in a node netns, as it does on every Kubernetes node
(kube-proxy's NAT, Cilium's own tracking): the agent's DNAT capture table needs conntrack, so a mesh node has it,
and the baselines' nodes must pay the same or the comparison would charge Ambit for Kubernetes."""


def track_connections(netns: str) -> None:
    argv = procs.in_netns(netns, ["nft", "-f", "-"])
    out = subprocess.run(argv, input=CONNTRACK_TABLE, capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise DriverUnavailable(f"cannot turn conntrack on in {netns}: {out.stderr.strip()[-300:]}")


class BenchLabs:
    def __init__(self, group: ProcessGroup, tools: Tools, pinning: Pinning, log_dir: Path) -> None:
        self._group = group
        self._log_dir = log_dir
        self._tools = tools
        self._pinning = pinning
        self._sites: dict[str, LabSite] = {}
        self._failures: dict[str, str] = {}
        self._suffix = secrets.token_hex(2)
        self.names: list[str] = []  # every lab this run tried to build (its netns names start with these)

    def get(self, kind: str, config_dir: Path | None = None) -> LabSite:
        """The lab of this kind, built on first use (from bench/topology unless config_dir is given); raises
        DriverUnavailable (remembered) when it cannot be."""
        if kind in self._sites:
            return self._sites[kind]
        if kind in self._failures:
            raise DriverUnavailable(self._failures[kind])
        try:
            site = self._up(kind, config_dir or TOPOLOGY / TOPOLOGY_DIRS[kind])
        except DriverUnavailable as exc:
            self._failures[kind] = str(exc)
            raise
        self._sites[kind] = site
        return site

    def _up(self, kind: str, config_dir: Path) -> LabSite:
        name = f"bench{kind[0]}-{self._suffix}"
        self.names.append(name)
        try:
            lab = Lab.up(config_dir, name=name, mesh=kind in MESH_KINDS)
        except (LabError, OSError, subprocess.SubprocessError) as exc:  # the lab's own words are the best reason
            reason = f"{kind} lab ({name}) did not come up: {type(exc).__name__}: {exc}"
            raise DriverUnavailable(self._keep_failed_logs(name, reason)) from exc
        site = LabSite(kind, lab)
        self._sites[kind] = site
        try:
            for node in lab.nodes.values():
                track_connections(node.netns)
            for key in SERVER_PODS.get(kind, ()):
                self._start_backends(site, key)
        except (procs.ProcessDied, TimeoutError, OSError, LabError) as exc:
            raise DriverUnavailable(f"backends in the {kind} lab did not start: {exc}") from exc
        return site

    def _keep_failed_logs(self, name: str, reason: str) -> str:
        """A failed `up` leaves its logs under the lab's state directory for diagnosis; move them into the results
        (where the report points) so the run leaves nothing behind."""
        leftover = state_dir(name)
        logs = leftover / "logs"
        if not logs.is_dir():
            return reason
        kept = self._log_dir / f"lab-{name}"
        shutil.move(str(logs), kept)
        if not any(leftover.iterdir()):
            leftover.rmdir()
        return reason.replace(str(logs), str(kept))

    def _start_backends(self, site: LabSite, key: str) -> None:
        pod = site.pod(key)
        cpus = self._pinning.for_node(pod.node)
        tag = f"{site.kind}-{key.replace('/', '-')}"
        self._group.start(f"echo-{tag}", [str(self._tools.echo_server), str(ECHO_PORT)], netns=pod.netns, cpus=cpus)
        self._group.start(f"iperf3-{tag}", ["iperf3", "-s", "-p", str(IPERF_PORT)], netns=pod.netns, cpus=cpus)
        procs.wait_for_listener(pod.netns, ECHO_PORT)
        procs.wait_for_listener(pod.netns, IPERF_PORT)

    def release(self, kind: str) -> None:
        """Take one lab down now (the 100-pod lab is not kept around while anything else is measured)."""
        site = self._sites.pop(kind, None)
        if site is None:
            return
        try:
            site.lab.down()
        except (LabError, OSError) as exc:  # keep taking the others down; say what was left behind
            print(f"bench: taking the {kind} lab down failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        """Take every lab down even if one fails to (each down is independent)."""
        for kind in list(self._sites):
            self.release(kind)
