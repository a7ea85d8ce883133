"""Capture on the lab's own cluster (examples/basic, no mesh processes): the Redirector finds the lab's pod veths
(/32 routes, Calico-style link-local gateway), captures an enrolled pod's outbound connection across nodes, and
captures plaintext arriving over the uplink from another node's non-enrolled pod."""

from __future__ import annotations

import subprocess
import sys

from agent.redirect import RedirectConfig, Redirector, cleanup
from lab import netns
from tests.integration.conftest import LabFactory
from tests.support.redirect_topology import REPO, connect


def test_capture_in_the_lab_cluster(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    node = lab.node("node1")
    client, server1, web = lab.pod("demo/client"), lab.pod("demo/server-1"), lab.pod("legacy/web")
    cfg = RedirectConfig(instance=f"{lab.name}-node1", uplinks=(node.uplink,))
    r = Redirector(cfg)
    listener = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{node.netns}", sys.executable, "-m", "tests.support.tcp_probe", "serve",
         "--transparent", "--port", "15001", "--port", "15006", "--port", "15008"],
        stdout=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        assert listener.stdout is not None and b"READY" in listener.stdout.readline()
        with netns.enter(node.netns):
            r.start()
        local = {p.ip for p in lab.pods.values() if p.node == "node1" and not p.host_network}
        assert r.reconcile({client.ip}, local) == {}
        assert r.status()["interfaces"][client.host_veth]["enrolled"] == [client.ip]
        out = connect(client.netns, server1.ip, 8080)
        assert out.startswith("tproxy:15001 ") and f"orig={server1.ip}:8080" in out
        inbound = connect(web.netns, client.ip, 9000)
        assert inbound.startswith("tproxy:15006 ") and f"peer={web.ip}:" in inbound
        assert r.counters()[client.ip].connections_in >= 1
    finally:
        listener.kill()
        listener.wait()
        r.close()
        with netns.enter(node.netns):
            cleanup(cfg)
