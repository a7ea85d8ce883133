"""DNAT capture on a bridge CNI (flannel's cni0, the bridge plugin), with the real kernel program and the bridge
topology of test_capture_bridge (a transparent probe listener stands in for the agent): kube-proxy's DNAT of a
VIP to a pod of the bridge happens after the ports' and the bridge's programs have seen the VIP."""

from __future__ import annotations

import subprocess

from tests.integration.test_capture_bridge import Bridged, _captured, bridged  # noqa: F401 (a fixture)
from tests.support import redirect_topology as rt

VIP, VIP_PLAIN = "10.96.7.1", "10.96.7.2"  # DNATed to pb (enrolled) and pd (not)


def test_connections_the_node_dnats_to_a_pod_of_the_bridge(bridged: Bridged) -> None:  # noqa: F811
    pa, pb, pc, pd = (bridged.pod(n) for n in ("pa", "pb", "pc", "pd"))
    with rt.enter(bridged.topo.node):  # as the agent runs: its DNAT table goes into the netns nft runs in
        assert bridged.r.reconcile(bridged.ips("pa", "pb"), bridged.everyone()) == {}
    rules = (
        "table ip test_dnat {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n"
        f"  ip daddr {VIP} tcp dport 8080 dnat to {pb.ip}\n"
        f"  ip daddr {VIP_PLAIN} tcp dport 8080 dnat to {pd.ip}\n }}\n}}\n"
    )
    subprocess.run(["ip", "netns", "exec", bridged.topo.node, "nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        # Not enrolled, through the VIP to an enrolled pod: the inbound plaintext listener, as when dialled directly.
        got = rt.connect(pc.netns, VIP, 8080)
        assert _captured(got, 15006, pb.ip, pc.ip), got
        # Enrolled, its SYN captured at its port before the rewrite; the handshake's later packets (the probe
        # speaks first, so its line needs them) reach the listener's socket after it.
        got = rt.connect(pa.netns, VIP, 8080)
        assert _captured(got, 15001, pb.ip, pa.ip), got
        got = rt.connect(pa.netns, VIP_PLAIN, 8080)
        assert _captured(got, 15001, pd.ip, pa.ip), got
        # Between pods outside the mesh the DNAT is left alone.
        got = rt.connect(pc.netns, VIP_PLAIN, 8080)
        assert got.startswith(f"server:8080 local={pd.ip}:8080"), got
    finally:
        subprocess.run(["ip", "netns", "exec", bridged.topo.node, "nft", "delete", "table", "ip", "test_dnat"])
