"""Shared shape of the reference configurations: a client-side proxy in node1's netns and a server-side proxy in
node2's netns of the plain lab, which is where a node proxy (ztunnel, Ambit's agent) sits.

The client pod uses the client-side proxy as an explicit proxy: it dials node1's address on one listener per
destination (echo, iperf), because there is no capture in the plain lab. Envoy's reference configuration works the
same way (one listener per original destination).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.certs import CertFiles
from bench.drivers.base import Endpoint, Proxy
from bench.labs import ECHO_PORT, IPERF_PORT, BenchLabs, Pinning
from bench.procs import ProcessGroup, Tracked


@dataclass(frozen=True)
class PairAddresses:
    client_node_ip: str
    server_node_ip: str
    server_pod_ip: str
    echo_target: tuple[str, int]
    iperf_target: tuple[str, int]


class NodeProxyPair:
    """Subclasses say how to launch each side; this class places them, waits for them and builds the Endpoint."""

    name = ""
    title = ""
    description = ""
    client_ports: tuple[int, int] = (0, 0)  # (echo, iperf) listeners of the client-side proxy
    server_ports: tuple[int, ...] = ()  # listeners of the server-side proxy

    def __init__(self, labs: BenchLabs, group: ProcessGroup, pinning: Pinning, certs: CertFiles, work: Path) -> None:
        self._labs = labs
        self._group = group
        self._pinning = pinning
        self.certs = certs
        self.work = work
        self._started: list[Tracked] = []

    def client_argv(self, addrs: PairAddresses) -> list[str]:
        raise NotImplementedError

    def server_argv(self, addrs: PairAddresses) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> Endpoint:
        site = self._labs.get("plain")
        client, server = site.pod("bench/client"), site.pod("bench/server")
        client_node, server_node = site.node(client.node), site.node(server.node)
        addrs = PairAddresses(
            client_node_ip=client_node.ip,
            server_node_ip=server_node.ip,
            server_pod_ip=server.ip,
            echo_target=(server.ip, ECHO_PORT),
            iperf_target=(server.ip, IPERF_PORT),
        )
        self.work.mkdir(parents=True, exist_ok=True)
        server_proc = self._group.start(
            f"{self.name}-server",
            self.server_argv(addrs),
            netns=server_node.netns,
            cpus=self._pinning.for_node(server_node.name),
        )
        self._started.append(server_proc)
        client_proc = self._group.start(
            f"{self.name}-client",
            self.client_argv(addrs),
            netns=client_node.netns,
            cpus=self._pinning.for_node(client_node.name),
        )
        self._started.append(client_proc)
        for port in self.server_ports:
            self._wait(server_proc, server_node.netns, port)
        for port in self.client_ports:
            self._wait(client_proc, client_node.netns, port)
        return Endpoint(
            client_netns=client.netns,
            echo=(client_node.ip, self.client_ports[0]),
            iperf=(client_node.ip, self.client_ports[1]),
            proxies=[Proxy("client-side", client_proc.pid), Proxy("server-side", server_proc.pid)],
            client_cpus=self._pinning.for_node(client.node),
        )

    def _wait(self, tracked: Tracked, netns: str, port: int) -> None:
        try:
            procs.wait_for_listener(netns, port, timeout=15.0)
        except TimeoutError as exc:
            self._group.check(tracked)  # a dead proxy explains more than a timeout
            raise procs.ProcessDied(f"{tracked.name}: {exc}; log: {tracked.log_tail()}") from exc

    def close(self) -> None:
        for tracked in self._started:
            self._group.stop(tracked)
        self._started.clear()
