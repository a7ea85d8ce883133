"""(f) The Python mTLS relay pair (bench/tls_relay.py): TLS without HTTP/2 or pooling, an extra reference."""

from __future__ import annotations

import sys

from bench.drivers.node_pair import NodeProxyPair, PairAddresses

CLIENT_ECHO_PORT = 15011
CLIENT_IPERF_PORT = 15012
SERVER_ECHO_PORT = 15018
SERVER_IPERF_PORT = 15019


class PythonTlsPair(NodeProxyPair):
    name = "pytls"
    title = "Python mTLS relay pair"
    description = (
        "client pod -> Python relay (node1, uvloop) -> one mTLS connection per user connection, no HTTP/2 -> "
        "Python relay (node2) -> server pod"
    )
    client_ports = (CLIENT_ECHO_PORT, CLIENT_IPERF_PORT)
    server_ports = (SERVER_ECHO_PORT, SERVER_IPERF_PORT)

    def _argv(self, role: str, maps: list[str], cert: str, key: str) -> list[str]:
        argv = [sys.executable, "-m", "bench.tls_relay", role, "--cert", cert, "--key", key]
        argv += ["--root", str(self.certs.root)]
        for mapping in maps:
            argv += ["--map", mapping]
        return argv

    def client_argv(self, addrs: PairAddresses) -> list[str]:
        maps = [
            f"{addrs.client_node_ip}:{CLIENT_ECHO_PORT}={addrs.server_node_ip}:{SERVER_ECHO_PORT}",
            f"{addrs.client_node_ip}:{CLIENT_IPERF_PORT}={addrs.server_node_ip}:{SERVER_IPERF_PORT}",
        ]
        return self._argv("client", maps, str(self.certs.client_cert), str(self.certs.client_key))

    def server_argv(self, addrs: PairAddresses) -> list[str]:
        maps = [
            f"{addrs.server_node_ip}:{SERVER_ECHO_PORT}={addrs.echo_target[0]}:{addrs.echo_target[1]}",
            f"{addrs.server_node_ip}:{SERVER_IPERF_PORT}={addrs.iperf_target[0]}:{addrs.iperf_target[1]}",
        ]
        return self._argv("server", maps, str(self.certs.server_cert), str(self.certs.server_key))
