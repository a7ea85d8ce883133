"""(g) Ambit's HBONE tunnel pair alone: agent.tunnel + agent.pool as node proxies, no capture, policy or xDS.

Placed exactly like the Envoy pair (explicit listener on node1, tunnel to node2, dial the server pod), so the two
HBONE implementations are compared in the same topology; the sides are bench/hbone_micro.py's `ambit-client` and
`ambit-server` (HBONE's own wrappers of the agent's tunnel code).
"""

from __future__ import annotations

import sys

from bench.drivers.node_pair import NodeProxyPair, PairAddresses

CLIENT_ECHO_PORT = 15031
CLIENT_IPERF_PORT = 15032
HBONE_PORT = 15108  # the Envoy pair's server holds 15008 on the same node


class AmbitTunnelPair(NodeProxyPair):
    name = "ambit-tunnel"
    title = "Ambit HBONE tunnel pair"
    description = (
        "client pod -> Ambit tunnel client (node1, agent.pool, explicit listener per destination) -> HBONE: HTTP/2 "
        "CONNECT over mTLS -> Ambit tunnel server (node2, agent.tunnel) -> server pod; uvloop, one process per side"
    )
    client_ports = (CLIENT_ECHO_PORT, CLIENT_IPERF_PORT)
    server_ports = (HBONE_PORT,)

    def _common(self, cert: str, key: str) -> list[str]:
        return ["--cert", cert, "--key", key, "--root", str(self.certs.root), "--loop", "uvloop"]

    def client_argv(self, addrs: PairAddresses) -> list[str]:
        argv = [sys.executable, "-m", "bench.hbone_micro", "ambit-client"]
        argv += ["--hbone", f"{addrs.server_node_ip}:{HBONE_PORT}"]
        for port, (ip, target_port) in ((CLIENT_ECHO_PORT, addrs.echo_target), (CLIENT_IPERF_PORT, addrs.iperf_target)):
            argv += ["--map", f"{addrs.client_node_ip}:{port}={ip}:{target_port}"]
        return argv + self._common(str(self.certs.client_cert), str(self.certs.client_key))

    def server_argv(self, addrs: PairAddresses) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "bench.hbone_micro",
            "ambit-server",
            "--listen",
            f"{addrs.server_node_ip}:{HBONE_PORT}",
        ]
        return argv + self._common(str(self.certs.server_cert), str(self.certs.server_key))
