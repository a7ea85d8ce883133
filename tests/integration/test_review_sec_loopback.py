"""Security review: a pod reaching the node's loopback with forged packets (CVE-2020-8558's class).

The agent runs in the node's network namespace (hostNetwork), so 127.0.0.1 there is the node's: the agent's admin
port (15000: /config_dump, /logging, POST /quitquitquit), the kubelet's 10248, kube-proxy's 10249. A pod cannot
reach it with its own stack (127.0.0.1 is its own loopback), but with CAP_NET_RAW it can write a SYN to 127.0.0.1
out of its interface, and when the node has net.ipv4.conf.*.route_localnet=1 (kube-proxy's iptables mode sets it
for NodePorts on localhost) the node's kernel accepts it. ztunnel's admin port is on the loopback of ztunnel's own
pod network namespace, which no workload pod shares.

Two ways in, both tried here with a hand-written handshake from a pod netns (tests/support/forged_tcp.py):
- straight to a server bound to 127.0.0.1 (a pod the agent does not capture): the operator HTTP server answers
  only peers on loopback when it is bound there (common/http.py);
- through the data-path listeners (an enrolled pod's SYN is assigned to 15001 whatever its destination, and the
  outbound then connects to 127.0.0.1 from the node's own loopback: measured in a lab with route_localnet=1, the
  pod read /config_dump's route list from 127.0.0.1:15000 and a 127.0.0.1:10248 listener saw the connection come
  from 127.0.0.1): a listener drops a connection to a loopback address from a non-loopback client before its
  handler sees it (agent/sockets.py).
Both tests fail before the fix: the forged client got the 404 of the admin server, and the handler ran.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.sockets import Listener, transparent_listener
from common.http import HttpServer, Request, Response
from lab import netns
from tests.support.forged_tcp import drop_own_resets, handshake

REQUEST = b"GET /config_dump HTTP/1.0\r\n\r\n"


@dataclass(frozen=True)
class Pair:
    node: str
    pod: str
    node_ip: str
    pod_ip: str
    pod_if: str
    macs: tuple[str, str]  # (pod's eth0, node's side of the veth)


def _mac(ns: str, ifname: str) -> str:
    return str(json.loads(netns.ip("-j", "link", "show", ifname, netns=ns))[0]["address"])


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A node netns with route_localnet=1 and a pod netns behind a veth, as a CNI wires them."""
    tag = secrets.token_hex(3)
    node, pod = f"secl-{tag}-node", f"secl-{tag}-pod"
    octet = secrets.randbelow(200) + 20
    node_ip, pod_ip = f"10.251.{octet}.1", f"10.251.{octet}.2"
    netns.add(node)
    try:
        netns.add(pod)
        try:
            netns.ip("link", "add", f"s{tag}", "type", "veth", "peer", "name", "eth0", "netns", pod, netns=node)
            netns.batch(node, [f"addr add {node_ip}/24 dev s{tag}", f"link set s{tag} up"])
            netns.batch(pod, [f"addr add {pod_ip}/24 dev eth0", "link set eth0 up", f"route add default via {node_ip}"])
            for key in ("all", f"s{tag}"):
                netns.write_sysctl(node, f"net.ipv4.conf.{key}.route_localnet", "1")
            drop_own_resets(pod)
            macs = (_mac(pod, "eth0"), _mac(node, f"s{tag}"))
            # The node resolves a reply's next hop with an ARP request from the reply's source, which the pod ignores
            # from 127.0.0.1: a pod that has talked to its node before has the entry, as this one now does.
            netns.ip("neigh", "replace", pod_ip, "lladdr", macs[0], "dev", f"s{tag}", "nud", "permanent", netns=node)
            yield Pair(node, pod, node_ip, pod_ip, "eth0", macs)
        finally:
            netns.delete(pod)
    finally:
        netns.delete(node)


async def _forge(p: Pair, dst: tuple[str, int]) -> tuple[bool, bytes]:
    ex = await asyncio.to_thread(handshake, p.pod, p.pod_if, p.macs, p.pod_ip, dst, REQUEST)
    return ex.accepted, ex.data


async def _admin_like(p: Pair, host: str) -> HttpServer:
    async def dump(_: Request) -> Response:
        return Response.text("secret config\n")

    s = HttpServer("admin")
    s.routes[("GET", "/config_dump")] = dump
    with netns.enter(p.node):
        await s.start(host, 0)
    return s


async def test_operator_server_on_loopback_answers_no_forged_pod_packet(pair: Pair) -> None:
    admin = await _admin_like(pair, "127.0.0.1")
    public = await _admin_like(pair, "0.0.0.0")  # the control: the same client is answered where it may be
    try:
        # The forged SYN reaches the server (route_localnet=1): the kernel completes the handshake...
        accepted, data = await _forge(pair, ("127.0.0.1", admin.port))
        assert accepted, "the node's kernel did not take the forged SYN: the attack was not tried"
        # ...but the server answers nothing to a peer that is not on loopback.
        assert b"secret" not in data and not data.startswith(b"HTTP/"), data[:200]
        accepted, data = await _forge(pair, (pair.node_ip, public.port))
        assert accepted and b"secret config" in data
    finally:
        await admin.close()
        await public.close()


async def test_data_path_listener_hands_no_forged_loopback_connection_to_its_handler(pair: Pair) -> None:
    seen: list[tuple[str, int]] = []

    async def handler(sock: socket.socket, dst: tuple[str, int]) -> None:
        seen.append(dst)
        sock.sendall(b"handled\n")
        sock.close()

    with netns.enter(pair.node):
        sock = transparent_listener(0, "0.0.0.0", transparent=False)
    listener = Listener(sock, handler, "outbound")
    listener.start()
    port = listener.address[1]
    try:
        accepted, data = await _forge(pair, ("127.0.0.1", port))
        assert accepted, "the node's kernel did not take the forged SYN: the attack was not tried"
        assert data == b"" and not seen, (data, seen)
        accepted, data = await _forge(pair, (pair.node_ip, port))  # the control: an ordinary destination
        assert accepted and data == b"handled\n" and seen == [(pair.node_ip, port)]
    finally:
        await listener.close()
