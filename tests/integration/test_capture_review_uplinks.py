"""Uplinks found without --uplink: a node whose other nodes' pod CIDRs are routed over a second network (not the
default route's, not a tunnel device) receives their HBONE there, and that interface was never captured.

    <p>-remote  eth0 10.77.0.2 --veth-- r<hex>u 10.77.0.1   <p>-node (default route via 10.77.0.2)
    <p>-sec     eth0 10.66.0.2 --veth-- r<hex>s 10.66.0.1   10.66.5.0/24 (another node's pods) via 10.66.0.2
    <p>-pa      eth0 10.77.1.10 --veth-- r<hex>a (enrolled)

A transparent probe listener in the node netns stands in for the agent; a plain probe server runs in pa.
"""

from __future__ import annotations

import select
import subprocess
from collections.abc import Iterator

import pytest

from agent.redirect import RedirectConfig, Redirector
from tests.support import redirect_topology as rt

OTHER_POD = "10.66.5.7"  # a pod of the node behind the second network


def _second_network(topo: rt.Topology, sec: str, ifname: str) -> None:
    subprocess.run(["ip", "netns", "add", sec], check=True)
    topo.ip(sec, "link", "set", "lo", "up")
    topo.ip(topo.node, "link", "add", ifname, "type", "veth", "peer", "name", "eth0", "netns", sec)
    topo.ip(topo.node, "addr", "add", "10.66.0.1/24", "dev", ifname)
    topo.ip(topo.node, "link", "set", ifname, "up")
    topo.ip(sec, "addr", "add", "10.66.0.2/24", "dev", "eth0")
    topo.ip(sec, "addr", "add", f"{OTHER_POD}/32", "dev", "lo")
    topo.ip(sec, "link", "set", "eth0", "up")
    topo.ip(sec, "route", "add", "default", "via", "10.66.0.1")


@pytest.fixture
def routed() -> Iterator[tuple[rt.Topology, Redirector, str, str]]:
    topo = rt.up(("pa",))
    sec, ifname = f"{topo.prefix}-sec", f"r{topo.prefix[-4:]}s"
    config = RedirectConfig(instance=topo.prefix)  # no --uplink
    r = Redirector(config)
    try:
        topo.ip(topo.node, "route", "add", "default", "via", topo.remote_ip)
        _second_network(topo, sec, ifname)
        with rt.enter(topo.node):
            r.start()
        topo.probe_server(topo.node, "serve", "--transparent", "--port", "15001", "--port", "15006", "--port", "15008")
        topo.probe_server(topo.pods["pa"].netns, "serve", "--port", "8080", "--port", "15008")
        yield topo, r, sec, ifname
    finally:
        try:
            rt.take_down(topo, r, config)
        finally:
            subprocess.run(["ip", "netns", "del", sec], capture_output=True)


def test_an_interface_other_nodes_pods_are_routed_by_is_an_uplink(
    routed: tuple[rt.Topology, Redirector, str, str],
) -> None:
    topo, r, sec, ifname = routed
    pa = topo.pods["pa"]
    watch = r.change_watch
    assert watch is not None
    assert r.status()["uplinks"] == [topo.uplink]  # no route through a router leaves by the second network yet
    watch.drain()
    topo.ip(topo.node, "route", "add", "10.66.5.0/24", "via", "10.66.0.2", "dev", ifname)
    # The route alone wakes the change watch, so the agent reconciles when such a route appears.
    assert select.select([watch], [], [], 3.0)[0] and watch.drain() is True
    assert r.reconcile({pa.ip}, {pa.ip}) == {}
    assert r.status()["uplinks"] == sorted([topo.uplink, ifname])
    # HBONE from the other node's pod to the enrolled pa goes to the agent's HBONE listener; plaintext to 15006.
    got = rt.connect(sec, pa.ip, 15008, src_ip=OTHER_POD)
    assert got.startswith(f"tproxy:15008 orig={pa.ip}:15008 peer={OTHER_POD}:"), got
    got = rt.connect(sec, pa.ip, 8080, src_ip=OTHER_POD)
    assert got.startswith(f"tproxy:15006 orig={pa.ip}:8080 peer={OTHER_POD}:"), got


def test_a_bridge_of_pods_routing_to_a_pod_stays_a_pod_interface(
    routed: tuple[rt.Topology, Redirector, str, str],
) -> None:
    """A prefix routed through a pod of a bridge (a pod acting as a router) does not make the bridge an uplink: its
    pods would all be refused as routed through an uplink."""
    topo, r, _, _ = routed
    short = f"r{topo.prefix[-4:]}"
    router = f"{topo.prefix}-router"
    subprocess.run(["ip", "netns", "add", router], check=True)
    try:
        topo.ip(topo.node, "link", "add", f"{short}br", "type", "bridge")
        topo.ip(topo.node, "addr", "add", "10.55.0.1/24", "dev", f"{short}br")
        topo.ip(topo.node, "link", "set", f"{short}br", "up")
        topo.ip(topo.node, "link", "add", f"{short}p", "type", "veth", "peer", "name", "eth0", "netns", router)
        topo.ip(topo.node, "link", "set", f"{short}p", "master", f"{short}br", "up")
        topo.ip(router, "addr", "add", "10.55.0.10/24", "dev", "eth0")
        topo.ip(router, "link", "set", "eth0", "up")
        topo.ip(topo.node, "route", "add", "10.56.0.0/24", "via", "10.55.0.10", "dev", f"{short}br")
        assert r.reconcile({"10.55.0.10"}, {"10.55.0.10"}) == {}
        assert f"{short}br" not in r.status()["uplinks"]
        assert r.status()["enrolled"] == ["10.55.0.10"]
    finally:
        r.reconcile(set(), set())
        subprocess.run(["ip", "netns", "del", router], capture_output=True)
