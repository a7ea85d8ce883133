"""(a) No mesh: the client pod dials the server pod directly. The physical limit of this lab, and the baseline."""

from __future__ import annotations

from bench.drivers.base import Endpoint
from bench.labs import ECHO_PORT, IPERF_PORT, BenchLabs, Pinning


class NoMesh:
    name = "nomesh"
    title = "no mesh (pod to pod)"
    description = "client pod -> server pod on the other node, plain TCP through the node netns and the core bridge"

    def __init__(self, labs: BenchLabs, pinning: Pinning) -> None:
        self._labs = labs
        self._pinning = pinning

    def prepare(self) -> Endpoint:
        site = self._labs.get("plain")
        client, server = site.pod("bench/client"), site.pod("bench/server")
        return Endpoint(
            client_netns=client.netns,
            echo=(server.ip, ECHO_PORT),
            iperf=(server.ip, IPERF_PORT),
            client_cpus=self._pinning.for_node(client.node),
        )

    def close(self) -> None:
        """Nothing of its own to stop: the lab and its backends belong to BenchLabs."""
