"""(a) No mesh: the client pod dials a server pod directly, across nodes or on its own node.

Cross-node is the physical limit of this lab and the baseline of the cross-node figures. Same-node is the
like-for-like baseline of Ambit's same-node path: the same two pods on one node, only the mesh missing, so a
same-node ratio measures what the mesh costs and not what the core bridge and a second node netns cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.drivers.base import DriverUnavailable, Endpoint
from bench.labs import ECHO_PORT, IPERF_PORT, BenchLabs, Pinning


@dataclass(frozen=True)
class NoMeshPath:
    """Which server pod the client dials, and whether it must share the client's node."""

    name: str
    title: str
    description: str
    server_key: str
    same_node: bool


NOMESH_PATHS = (
    NoMeshPath(
        "nomesh",
        "no mesh (pod to pod)",
        "client pod -> server pod on the other node, plain TCP through the node netns and the core bridge",
        "bench/server",
        same_node=False,
    ),
    NoMeshPath(
        "nomesh-same",
        "no mesh, same node",
        "client pod -> server pod on the same node (node1), plain TCP through node1's netns only",
        "bench/server-local",
        same_node=True,
    ),
)


class NoMesh:
    def __init__(self, path: NoMeshPath, labs: BenchLabs, pinning: Pinning) -> None:
        self.path = path
        self.name = path.name
        self.title = path.title
        self.description = path.description
        self._labs = labs
        self._pinning = pinning

    def prepare(self) -> Endpoint:
        site = self._labs.get("plain")
        client, server = site.pod("bench/client"), site.pod(self.path.server_key)
        # The topology, not this code, places the pods: refuse to report a baseline whose placement is not its name.
        if (client.node == server.node) != self.path.same_node:
            where = "the same node" if self.path.same_node else "different nodes"
            raise DriverUnavailable(
                f"{self.name} needs {client.key} and {server.key} on {where}, but the plain topology puts them on "
                f"{client.node} and {server.node}"
            )
        return Endpoint(
            client_netns=client.netns,
            echo=(server.ip, ECHO_PORT),
            iperf=(server.ip, IPERF_PORT),
            client_cpus=self._pinning.for_node(client.node),
        )

    def close(self) -> None:
        """Nothing of its own to stop: the lab and its backends belong to BenchLabs."""
