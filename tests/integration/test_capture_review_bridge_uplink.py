"""A bridge of pods with an uplink among its ports (an L2 overlay's tunnel device, or a host link enslaved next to the
pods' veths): what arrives there comes from other hosts, so it may never carry an enrolled local pod's address.

    <p>-pa      eth0 10.78.0.11/24 --veth-- r<hex>a \\
                                                    r<hex>br 10.78.0.1/24 in <p>-node (capture here)
    <p>-ov      eth0 10.78.0.50/24 --veth-- r<hex>o /   (an uplink: --uplink names it)

Such a port carries the program in the uplink role, which only looked at TCP *to* an enrolled pod; a frame from
another host with pa's address to anywhere else was passed up to the bridge, whose program took it for pa's own
(pa's home, its port, is one of the bridge's) and captured it as pa's outbound connection.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from agent.redirect import RedirectConfig, Redirector
from tests.integration.test_capture_bridge import GATEWAY, GATEWAY6, LISTENER, Bridged
from tests.support import redirect_topology as rt


@pytest.fixture
def overlaid() -> Iterator[tuple[Bridged, str, str]]:
    prefix = "ambit-" + secrets.token_hex(2)
    short = "r" + prefix[-4:]
    topo = rt.Topology(prefix=prefix, node=f"{prefix}-node", remote=f"{prefix}-ov", uplink=f"{short}o")
    config = RedirectConfig(instance=prefix, uplinks=(topo.uplink,))
    env = Bridged(topo, f"{short}br", config, Redirector(config))
    try:
        for ns in (topo.node, topo.remote):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            topo.ip(ns, "link", "set", "lo", "up")
        topo.ip(topo.node, "link", "add", env.bridge, "type", "bridge")
        topo.ip(topo.node, "addr", "add", f"{GATEWAY}/24", "dev", env.bridge)
        topo.ip(topo.node, "addr", "add", f"{GATEWAY6}/64", "dev", env.bridge, "nodad")
        topo.ip(topo.node, "link", "set", env.bridge, "up")
        topo.ip(topo.node, "link", "add", topo.uplink, "type", "veth", "peer", "name", "eth0", "netns", topo.remote)
        topo.ip(topo.node, "link", "set", topo.uplink, "master", env.bridge, "up")
        topo.ip(topo.remote, "addr", "add", "10.78.0.50/24", "dev", "eth0")
        topo.ip(topo.remote, "link", "set", "eth0", "up")
        env.add_pod("pa", 1)
        with rt.enter(topo.node):
            env.r.start()
        topo.probe_server(topo.node, *LISTENER)
        yield env, topo.remote, topo.uplink
    finally:
        rt.take_down(topo, env.r, config)


def test_an_uplink_port_of_a_bridge_never_sends_as_a_local_pod(overlaid: tuple[Bridged, str, str]) -> None:
    bridged, ov, port = overlaid
    pa = bridged.pod("pa")
    assert bridged.r.reconcile(bridged.ips("pa"), bridged.everyone()) == {}
    assert bridged.r.status()["interfaces"][port]["role"] == "uplink"
    # From the overlay's host to the enrolled pa: captured there, as before (plaintext to 15006).
    got = rt.connect(ov, pa.ip, 8080)
    assert got.startswith(f"tproxy:15006 orig={pa.ip}:8080 peer=10.78.0.50:"), got
    stats = bridged.r.stats()
    bridged.topo.ip(ov, "addr", "add", f"{pa.ip}/32", "dev", "eth0")
    try:
        with pytest.raises(OSError):  # as pa, to the gateway: was captured as pa's outbound call (and completed)
            rt.connect(ov, GATEWAY, 8080, src_ip=pa.ip, timeout=1.0)
    finally:
        bridged.topo.ip(ov, "addr", "del", f"{pa.ip}/32", "dev", "eth0")
        bridged.topo.ip(bridged.topo.node, "neigh", "flush", "all")
    after = bridged.r.stats()
    assert after["capture_outbound"] == stats["capture_outbound"]
    assert bridged.r.spoofed_drops().get(port, 0) >= 1
    assert rt.connect(pa.netns, GATEWAY, 8080).startswith("tproxy:15001 ")  # pa's own call, captured as pa
