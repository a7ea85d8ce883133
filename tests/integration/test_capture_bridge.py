"""Capture on a bridge CNI (flannel's cni0, the bridge plugin) with the real kernel program: the pods' node-side
veths are ports of one bridge, which holds the gateway address and the route to every pod.

    <p>-pa/pb/pc/pd  eth0 10.78.0.1x/24, fd78::1x/64 --veth-- r<hex><a|b|c|d> ports of r<hex>br 10.78.0.1/24, fd78::1
                                                                               in <p>-node (+ an idle uplink)

Two pods of one bridge talk through its L2 switching, which never passes their frames up to the bridge's own
ingress: before the ports carried the program, an enrolled pod's call to a pod on its bridge, and a non-enrolled
pod's plaintext call to an enrolled one (past STRICT mTLS), were never captured. A transparent probe listener in
the node netns stands in for the agent, plain probe servers run in the pods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import select
import socket
import subprocess
from collections.abc import Iterator

import pytest

from agent.redirect import RedirectConfig, Redirector
from agent.redirect_maps import RedirectMaps
from tests.integration.test_redirect_capture import _fragments, _mac, _next_seqs, _send_frame, _tcp_packet
from tests.support import redirect_topology as rt

LISTENER = ("serve", "--transparent", "--dual", "--port", "15001", "--port", "15006", "--port", "15008")
GATEWAY, GATEWAY6 = "10.78.0.1", "fd78::1"


@dataclasses.dataclass
class Bridged:
    topo: rt.Topology
    bridge: str
    config: RedirectConfig
    r: Redirector

    def pod(self, name: str) -> rt.Pod:
        return self.topo.pods[name]

    def ips(self, *names: str) -> set[str]:
        return {ip for n in names for ip in (self.pod(n).ip, self.pod(n).ip6)}

    def everyone(self) -> set[str]:
        return self.ips(*self.topo.pods)

    def filters(self, ifname: str) -> str:
        return self.topo.tc("filter", "show", "dev", ifname, "ingress")

    def add_pod(self, name: str, n: int) -> rt.Pod:
        topo = self.topo
        pod = rt.Pod(
            name, f"{topo.prefix}-{name}", f"10.78.0.{10 + n}", f"r{topo.prefix[-4:]}{name}", f"fd78::{10 + n}"
        )
        subprocess.run(["ip", "netns", "add", pod.netns], check=True)
        topo.pods[name] = pod
        topo.ip(pod.netns, "link", "set", "lo", "up")
        topo.ip(topo.node, "link", "add", pod.node_if, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        topo.ip(topo.node, "link", "set", pod.node_if, "master", self.bridge, "up")
        topo.ip(pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        topo.ip(pod.netns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
        topo.ip(pod.netns, "link", "set", "eth0", "up")
        topo.ip(pod.netns, "route", "add", "default", "via", GATEWAY)
        topo.ip(pod.netns, "-6", "route", "add", "default", "via", GATEWAY6)
        topo.probe_server(pod.netns, "serve", "--dual", "--port", "8080")
        return pod


@pytest.fixture(scope="module")
def bridged() -> Iterator[Bridged]:
    prefix = "ambit-" + secrets.token_hex(2)
    short = "r" + prefix[-4:]
    # No remote node: `remote` names a namespace that is never made (down() tolerates it).
    topo = rt.Topology(prefix=prefix, node=f"{prefix}-node", remote=f"{prefix}-none", uplink=f"{short}u")
    config = RedirectConfig(instance=prefix, uplinks=(topo.uplink,))
    env = Bridged(topo, f"{short}br", config, Redirector(config))
    try:
        subprocess.run(["ip", "netns", "add", topo.node], check=True)
        topo.ip(topo.node, "link", "set", "lo", "up")
        forwarding = ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        subprocess.run(
            ["ip", "netns", "exec", topo.node, "sysctl", "-qw", *forwarding], check=True, capture_output=True
        )
        topo.ip(topo.node, "link", "add", topo.uplink, "type", "veth", "peer", "name", f"{short}v")  # no dummy module
        topo.ip(topo.node, "link", "set", topo.uplink, "up")
        topo.ip(topo.node, "link", "add", env.bridge, "type", "bridge")
        topo.ip(topo.node, "addr", "add", f"{GATEWAY}/24", "dev", env.bridge)
        topo.ip(topo.node, "addr", "add", f"{GATEWAY6}/64", "dev", env.bridge, "nodad")
        topo.ip(topo.node, "link", "set", env.bridge, "up")
        for n, name in enumerate(("pa", "pb", "pc", "pd"), start=1):
            env.add_pod(name, n)
        with rt.enter(topo.node):
            env.r.start()
        topo.probe_server(topo.node, *LISTENER)
        yield env
    finally:
        rt.take_down(topo, env.r, config)


def _captured(got: str, listener: int, orig: str, peer: str) -> bool:
    fmt = (lambda ip: f"[{ip}]") if ":" in orig else (lambda ip: ip)
    return got.startswith(f"tproxy:{listener} ") and f"orig={fmt(orig)}:8080" in got and f"peer={fmt(peer)}:" in got


def test_same_bridge_calls_of_and_to_enrolled_pods_are_captured(bridged: Bridged) -> None:
    pa, pb, pc, pd = (bridged.pod(n) for n in ("pa", "pb", "pc", "pd"))
    assert bridged.r.reconcile(bridged.ips("pa", "pb"), bridged.everyone()) == {}
    stats = bridged.r.stats()
    for family in ("ip", "ip6"):
        a, b, c, d = (getattr(p, family) for p in (pa, pb, pc, pd))
        # Enrolled -> enrolled on one bridge: to the outbound listener, with the original destination.
        got = rt.connect(pa.netns, b, 8080)
        assert _captured(got, 15001, b, a), got
        # Enrolled -> non-enrolled on the bridge: outbound too.
        assert _captured(rt.connect(pb.netns, c, 8080), 15001, c, b)
        # Non-enrolled -> enrolled in plaintext: the inbound plaintext path, where STRICT mTLS is enforced.
        got = rt.connect(pc.netns, a, 8080)
        assert _captured(got, 15006, a, c), got
        # Between two non-enrolled pods nothing changes, though their ports carry the program.
        assert rt.connect(pc.netns, d, 8080).startswith(f"server:8080 local={'[' + d + ']' if ':' in d else d}:8080")
    ports = bridged.r.status()["interfaces"]
    assert {ports[p.node_if]["bridge"] for p in (pa, pb, pc, pd)} == {bridged.bridge}
    # Addressed to the bridge itself (how every call off the bridge leaves a pod): captured at the port all the same.
    assert _captured(rt.connect(pa.netns, GATEWAY, 8080), 15001, GATEWAY, pa.ip)
    after = bridged.r.stats()
    assert after["capture_outbound"] == stats["capture_outbound"] + 5
    assert after["capture_inbound"] == stats["capture_inbound"] + 2
    assert after["drop_spoofed"] == stats["drop_spoofed"]
    counters = bridged.r.counters()
    assert counters[pa.ip].connections_out == 2 and counters[pa.ip].connections_in == 1  # counted once, not twice


@contextlib.contextmanager
def _borrowed(bridged: Bridged, pod: rt.Pod, *addrs: str) -> Iterator[None]:
    """Give ``pod`` other pods' addresses to send from; removed after, with every neighbour entry its ARP and ND (sent
    from those addresses) planted in the node and the pods."""
    topo = bridged.topo
    for addr in addrs:
        topo.ip(pod.netns, "addr", "add", f"{addr}/{128 if ':' in addr else 32}", "dev", "eth0", "nodad")
    try:
        yield
    finally:
        for addr in addrs:
            topo.ip(pod.netns, "addr", "del", f"{addr}/{128 if ':' in addr else 32}", "dev", "eth0")
        for netns in (topo.node, *(p.netns for p in topo.pods.values())):
            topo.ip(netns, "neigh", "flush", "all")
            topo.ip(netns, "-6", "neigh", "flush", "all")


def test_a_pod_of_the_bridge_cannot_send_as_another(bridged: Bridged) -> None:
    """The bridge was the home of every pod behind it, so any pod of the bridge could send as an enrolled one and be
    captured as it (its certificate towards other nodes, its policy), enrolled or not. Its ARP request for the
    gateway, sent from the borrowed address, even moved the node's neighbour entry, so the answer came back to it and
    the connection completed. A pod's home is now the port whose veth's far end holds its address."""
    pa, pb, pc, pd = (bridged.pod(n) for n in ("pa", "pb", "pc", "pd"))
    assert bridged.r.reconcile(bridged.ips("pa", "pb"), bridged.everyone()) == {}
    stats, victim = bridged.r.stats(), bridged.r.counters()[pa.ip]
    with _borrowed(bridged, pc, pa.ip, pa.ip6), _borrowed(bridged, pb, pa.ip):
        # pc (not enrolled) as pa to a pod of the bridge, over IPv4 and IPv6; pb (enrolled) as pa off the bridge.
        for netns, src, dst in ((pc.netns, pa.ip, pd.ip), (pc.netns, pa.ip6, pd.ip6), (pb.netns, pa.ip, GATEWAY)):
            with pytest.raises(OSError):
                rt.connect(netns, dst, 8080, src_ip=src, timeout=1.0)
        after = bridged.r.stats()
        assert after["capture_outbound"] == stats["capture_outbound"]  # nothing was captured as pa
        assert bridged.r.counters()[pa.ip] == victim
        by_if = bridged.r.spoofed_drops()
        assert by_if.get(pc.node_if, 0) >= 2 and by_if.get(pb.node_if, 0) >= 1 and pa.node_if not in by_if, by_if
    # Each pod's own calls are captured as before, at its port, as itself.
    for pod in (pa, pb):
        for src, dst in ((pod.ip, pd.ip), (pod.ip6, pd.ip6), (pod.ip, GATEWAY)):
            assert _captured(rt.connect(pod.netns, dst, 8080), 15001, dst, src)
    assert bridged.r.stats()["capture_outbound"] == after["capture_outbound"] + 6


def test_the_return_path_of_source_preserving_connections_crosses_the_bridge(bridged: Bridged) -> None:
    """The agent connects to the destination pod from the client's own address; that pod answers the client's
    MAC (it resolved the address on its bridge), so its port must hand the replies to the agent's socket."""
    pa, pb, pc = (bridged.pod(n) for n in ("pa", "pb", "pc"))
    topo = bridged.topo
    listener = next(p for p in topo.procs if "--transparent" in list(p.args))  # type: ignore[arg-type]
    topo.stop(listener)
    relay = topo.probe_server(topo.node, *LISTENER, "--relay")
    try:
        assert bridged.r.reconcile(bridged.ips("pa", "pb"), bridged.everyone()) == {}
        for src, dst, port in ((pa, pb, 15001), (pa, pc, 15001), (pc, pa, 15006)):
            got = rt.connect(src.netns, dst.ip, 8080, timeout=4)
            assert got.startswith(f"relayed:{port} server:8080 local={dst.ip}:8080 peer={src.ip}:"), got
    finally:
        topo.stop(relay)
        topo.probe_server(topo.node, *LISTENER)


@contextlib.contextmanager
def _agent_side(bridged: Bridged, dst: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """pa (enrolled) calls ``dst``:8080, captured to a transparent stand-in for the agent's outbound listener: (pa's
    socket, the agent-side one). The probe listener is back afterwards."""
    pa, topo = bridged.pod("pa"), bridged.topo
    bridged.r.reconcile(bridged.ips("pa"), bridged.everyone())
    probe = next(p for p in topo.procs if "--transparent" in list(p.args))  # type: ignore[arg-type]
    topo.stop(probe)
    try:
        with rt.captured_by_hand(topo.node, pa.netns, bridged.config.outbound_port, dst) as pair:
            yield pair
    finally:
        topo.probe_server(topo.node, *LISTENER)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_fragments_between_pods_of_a_bridge_reach_the_agent(bridged: Bridged) -> None:
    """A later IP fragment from a port goes up to the bridge with the first one (MAC rewritten, marked), not
    switched on to the pod it was sent to."""
    pa, pb = bridged.pod("pa"), bridged.pod("pb")
    with _agent_side(bridged, pb.ip) as (client, agent_side):
        expected, sent = _next_seqs(client)
        data = bytes(range(256)) * 4
        segment = _tcp_packet(pa.ip, pb.ip, client.getsockname()[1], 8080, sent, expected, 0x18, data)
        for fragment in _fragments(segment, 512):  # to pb's MAC, as pa's stack addresses a pod of its bridge
            _send_frame(pa.netns, "eth0", _mac(pb.netns, "eth0"), fragment)
        assert _recv_exactly(agent_side, len(data)) == data


def test_a_pod_of_the_bridge_cannot_complete_anothers_fragments(bridged: Bridged) -> None:
    """pc sends the later fragment of a segment of pa's connection to the bridge's own address (which the node
    reassembles whatever the mark): with the bridge as every pod's home, and no source check on later fragments,
    pc's bytes reached pa's captured connection as pa's."""
    pa, pc = bridged.pod("pa"), bridged.pod("pc")
    bridge_mac = _mac(bridged.topo.node, bridged.bridge)
    with _agent_side(bridged, GATEWAY) as (client, agent_side):
        expected, sent = _next_seqs(client)
        data = b"pa" * 256 + b"pc" * 256
        segment = _tcp_packet(pa.ip, GATEWAY, client.getsockname()[1], 8080, sent, expected, 0x18, data)
        first, later = _fragments(segment, 512)
        spoofed = bridged.r.spoofed_drops().get(pc.node_if, 0)
        _send_frame(pa.netns, "eth0", bridge_mac, first)
        _send_frame(pc.netns, "eth0", bridge_mac, later)
        agent_side.settimeout(1.0)
        with pytest.raises(TimeoutError):
            agent_side.recv(4096)
        rt.wait_for(lambda: bridged.r.spoofed_drops().get(pc.node_if, 0) > spoofed)
        agent_side.settimeout(2.0)
        _send_frame(pa.netns, "eth0", bridge_mac, later)  # pa's own completes it
        assert _recv_exactly(agent_side, len(data)) == data


def test_a_new_port_is_captured_and_ports_are_released_with_the_last_enrolled_pod(bridged: Bridged) -> None:
    pa = bridged.pod("pa")
    bridged.r.reconcile(bridged.ips("pa"), bridged.everyone())
    watch = bridged.r.change_watch
    assert watch is not None
    watch.drain()
    pe = bridged.add_pod("pe", 5)  # a pod the controller has not named yet
    assert select.select([watch], [], [], 3.0)[0] and watch.drain() is True
    assert bridged.r.reconcile(bridged.ips("pa"), bridged.everyone() - bridged.ips("pe")) == {}
    assert bridged.r.status()["interfaces"][pe.node_if]["bridge"] == bridged.bridge
    assert _captured(rt.connect(pe.netns, pa.ip, 8080), 15006, pa.ip, pe.ip)
    maps = RedirectMaps.open(bridged.config.pin_dir)
    try:
        assert len(maps.bridge_port_entries()) == 5
        bridged.r.reconcile(set(), bridged.everyone())
        assert maps.bridge_port_entries() == {}
        left = bridged.r.status()["interfaces"]
        assert set(left) == {bridged.topo.uplink}
        assert set(maps.iface_entries()) == {iface["ifindex"] for iface in left.values()}
    finally:
        maps.close()
    for pod in bridged.topo.pods.values():
        assert "ambit:" not in bridged.filters(pod.node_if)
    assert rt.connect(bridged.pod("pb").netns, pa.ip, 8080).startswith("server:8080")
