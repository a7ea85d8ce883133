"""The DNAT capture table's no-listener counter as a metric, read from a real table in a real netns by the
background poller (``nft -j`` as an asyncio subprocess), with real SYNs that the node DNATs to an enrolled address
while no agent listener is there.

    <p>c  eth0 10.78.0.2/24 --veth-- <p>b 10.78.0.1/24  <p>n: DNATs 10.96.7.7:80 to 10.78.5.5:80 (an "enrolled pod"),
                                                          and holds the agent's capture table (DnatCapture)
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.capture_dnat import DnatCapture, parse_no_listener_counts
from agent.capture_dnat_metrics import DnatCounterCollector
from lab import netns
from tests.support.mesh import nft_in

VIP, ENROLLED, OTHER = "10.96.7.7", "10.78.5.5", "10.78.5.6"
DROP, PASS = ("ipv4", "drop"), ("ipv4", "pass")
DROP6, PASS6 = ("ipv6", "drop"), ("ipv6", "pass")  # counted too (0 here: the client speaks IPv4)


@dataclass
class Node:
    client: str
    node: str
    capture: DnatCapture
    collector: DnatCounterCollector

    def syn(self) -> None:
        """One connection attempt from the client to the VIP; its SYNs meet the capture table after the DNAT."""
        with netns.enter(self.client):
            sock = socket.socket()
        sock.settimeout(0.3)
        try:
            with pytest.raises(OSError):  # dropped (no listener), or passed to a pod address nothing answers for
                sock.connect((VIP, 80))
        finally:
            sock.close()

    def raw_counts(self) -> dict[tuple[str, str], int]:
        """What the table there now counted (its own counters, which a rewrite starts at 0)."""
        return parse_no_listener_counts(nft_in(self.node, "-j", "list", "table", "inet", self.capture.table))[1]


@pytest.fixture
def node() -> Iterator[Node]:
    prefix = f"ambit-{secrets.token_hex(2)}"
    client, node = f"{prefix}c", f"{prefix}n"
    made: list[str] = []
    capture: DnatCapture | None = None
    try:
        for name in (client, node):
            netns.add(name)
            made.append(name)
        netns.ip("link", "add", f"{prefix}a", "netns", client, "type", "veth", "peer", "name", f"{prefix}b")
        netns.ip("link", "set", f"{prefix}b", "netns", node)
        netns.batch(client, ["link set lo up", f"link set {prefix}a up", f"addr add 10.78.0.2/24 dev {prefix}a"])
        netns.batch(client, ["route add default via 10.78.0.1"])
        netns.batch(node, ["link set lo up", f"link set {prefix}b up", f"addr add 10.78.0.1/24 dev {prefix}b"])
        netns.write_sysctl(node, "net.ipv4.ip_forward", "1")
        nft_in(
            node,
            "-f",
            "-",
            script="table ip kubeproxy {\n chain pre {\n  type nat hook prerouting priority dstnat;\n"
            f"  ip daddr {VIP} tcp dport 80 dnat to {ENROLLED}:80\n }}\n}}\n",
        )
        instance = prefix.replace("-", "_")
        capture = DnatCapture(instance, port=15006, hbone_port=15008, mark=0x100, mark_mask=0x100)
        with netns.enter(node):
            capture.bind_netns()
        collector = DnatCounterCollector(instance, netns=str(netns.path(node)), timeout=10.0)
        yield Node(client, node, capture, collector)
    finally:
        if capture is not None:
            capture.close()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


async def test_no_listener_syns_are_exported_and_survive_table_rewrites(node: Node) -> None:
    node.capture.sync([ENROLLED])
    assert await node.collector.poll()
    assert node.collector.counts.totals().get(DROP, 0) == 0

    node.syn()
    dropped = node.raw_counts()[DROP]
    assert dropped >= 1, "the SYN found no listener and the table dropped it"
    assert await node.collector.poll()
    assert node.collector.counts.totals()[DROP] == dropped
    family = next(f for f in node.collector.collect() if f.name == "ambit_capture_dnat_no_listener_packets")
    assert {(s.labels["family"], s.labels["action"]): s.value for s in family.samples} == {DROP: dropped, DROP6: 0}

    # Another SYN, then another enrolled address before the next poll: the table is replaced whole and its
    # counters start at 0; the sync read them first.
    node.syn()
    before_rewrite = node.raw_counts()[DROP]
    assert before_rewrite > dropped
    node.capture.sync([ENROLLED, OTHER])
    assert node.raw_counts().get(DROP, 0) == 0
    assert await node.collector.poll()
    assert node.collector.counts.totals()[DROP] == before_rewrite

    node.syn()
    again = node.raw_counts()[DROP]
    assert again >= 1
    assert await node.collector.poll()
    assert node.collector.counts.totals()[DROP] == before_rewrite + again

    # Fail-open: the SYN is counted and passed on to the pod, uncaptured. Then nothing is enrolled before the next
    # poll: the table goes, its counts read first.
    node.capture.fail_open = True
    node.capture.sync([ENROLLED, OTHER])
    node.syn()
    passed = node.raw_counts()[PASS]
    assert passed >= 1
    node.capture.sync([])
    assert await node.collector.poll(), "no table reads as nothing new, not as an error"
    assert node.collector.counts.totals() == {DROP: before_rewrite + again, DROP6: 0, PASS: passed, PASS6: 0}
    assert node.collector.read_errors == 0
