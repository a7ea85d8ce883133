"""Capture on the lab's own cluster (examples/basic, no mesh processes): the Redirector finds the lab's pod veths
(/32 routes, Calico-style link-local gateway), captures an enrolled pod's outbound connection across nodes, and
captures plaintext arriving over the uplink from another node's non-enrolled pod."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from agent.redirect import RedirectConfig, Redirector, cleanup
from lab import netns
from lab.observe import capture_status
from lab.plan import POD_GATEWAY, POD_IFACE
from tests.integration.conftest import LabFactory
from tests.support.mesh import wait_for
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


def test_the_agent_recaptures_a_pod_whose_interface_came_back(lab_factory: LabFactory) -> None:
    """A pod sandbox re-created with the same IP gets a new veth without the program, and the controller has no
    change to send. The agent used to reconcile only on config changes, so the pod's TCP stayed uncaptured
    (plaintext, no policy); it now follows the node's interface notifications and captures the pod again."""
    lab = lab_factory(mesh=True)
    node, client = lab.node("node1"), lab.pod("demo/client")

    def attached() -> dict[str, Any]:
        found: dict[str, Any] = capture_status(lab, "node1").get("interfaces", {}).get(client.host_veth, {})
        return found

    wait_for(lambda: client.ip in attached().get("enrolled", []), "demo/client to be captured")
    old = attached()["ifindex"]
    netns.batch(node.netns, [f"link del {client.host_veth}"])
    netns.batch(
        node.netns,
        [
            f"link add {client.host_veth} type veth peer name {POD_IFACE} netns {client.netns}",
            f"addr add {POD_GATEWAY}/32 dev {client.host_veth} scope link",
            f"link set {client.host_veth} up",
            f"route add {client.ip}/32 dev {client.host_veth} src {node.ip}",
        ],
    )
    netns.batch(
        client.netns,
        [
            f"addr add {client.ip}/32 dev {POD_IFACE}",
            f"link set {POD_IFACE} up",
            f"route add {POD_GATEWAY} dev {POD_IFACE} scope link",
            f"route add default via {POD_GATEWAY} dev {POD_IFACE}",
        ],
    )
    wait_for(lambda: attached().get("ifindex") not in (None, old), "the new interface to be captured", timeout=10)
    # The agent cannot tell this sandbox from a new pod reusing the IP until the controller names the workload
    # again, which it has no reason to do here: when a reconcile saw the address without its old interface first,
    # it is held (all its TCP dropped) for up to reuse_hold_seconds, then captured as the workload named for it.
    hold = RedirectConfig().reuse_hold_seconds
    wait_for(lambda: client.ip in attached().get("enrolled", []), "demo/client to be captured again", timeout=hold + 10)
    shown = subprocess.run(
        ["ip", "netns", "exec", node.netns, "tc", "filter", "show", "dev", client.host_veth, "ingress"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "ambit:" in shown
