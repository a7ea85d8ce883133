"""DNAT capture over IPv6 (agent/capture_dnat.py's ip6 rules), in the eBPF lab of examples/dualstack with a
kube-proxy-like IPv6 DNAT rule of our own on both nodes: a Service VIP for demo/server (enrolled, node2)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from lab.observe import agent_log
from tests.support.mesh import echo_from, nft, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dualstack"
VIP6 = "fd00:96::99"  # no lab interface has it: only the DNAT rule gives it a meaning
PORT = 9000  # every lab pod's workload echoes here


@pytest.fixture(scope="module")
def lab(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(EXAMPLE, name=f"ambit-d6{secrets.token_hex(2)}", mesh=True)
    try:
        server = lab.pod("demo/server").ip6
        rules = (
            "table ip6 test_dnat6 {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n"
            f"  ip6 daddr {VIP6} tcp dport {PORT} dnat to [{server}]:{PORT}\n }}\n}}\n"
        )
        for node in ("node1", "node2"):
            nft(lab, node, "-f", "-", script=rules)
        yield lab
    finally:
        lab.down()


def test_ipv6_connections_the_node_dnats_are_captured(lab: Lab) -> None:
    """legacy/web's plaintext through the VIP is carried by node2's agent (TPROXY to 15006, ip6 rules);
    demo/client's connection, rewritten on node1 after its SYN was captured there, is carried in HBONE."""
    web = lab.pod("legacy/web").ip6
    client = lab.pod("demo/client").ip6
    server = lab.pod("demo/server").ip6
    assert echo_from(lab, "legacy/web", VIP6, PORT) == ("ok", VIP6)
    assert echo_from(lab, "demo/client", VIP6, PORT) == ("ok", VIP6)

    def carried(node: str, src: str, direction: str) -> list[dict[str, object]]:
        return [
            r
            for r in agent_log(lab, node)
            if r.get("direction") == direction
            and str(r.get("src.addr", "")).startswith(f"[{src}]:")
            and f"[{server}]:{PORT}" in (r.get("dst.addr"), r.get("dst.hbone_addr"))
        ]

    wait_for(lambda: bool(carried("node2", web, "inbound")), "node2's agent carries legacy/web's connection")
    assert carried("node2", web, "inbound")[-1]["security"] == "plaintext"
    wait_for(lambda: bool(carried("node1", client, "outbound")), "node1's agent carries demo/client's connection")
    assert carried("node1", client, "outbound")[-1]["security"] == "mutual_tls"
