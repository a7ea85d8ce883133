"""A compact two-node network-namespace topology for the capture tests (the lab's full cluster is more than these
tests need: they want one node netns with a few pods, a peer node behind an uplink, and odd routes on demand).

    <p>-pa/pb/pc  eth0 10.77.{1,2,3}.10/24 --veth-- <p>a/b/c 10.77.{1,2,3}.1/24 \
                                                                                 <p>-node (ip_forward, capture here)
    <p>-remote    eth0 10.77.0.2/24        --veth-- <p>u     10.77.0.1/24       /   (uplink)  + 10.77.9.0/24 via .0.2

Every name carries a random prefix and :meth:`Topology.down` removes all of it (processes first).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.redirect import RedirectConfig, Redirector, cleanup
from common.netns import setns
from tests.support.mesh import nft_in

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Pod:
    name: str
    netns: str
    ip: str
    node_if: str  # node-side interface
    ip6: str


@dataclass
class Topology:
    prefix: str
    node: str
    remote: str
    uplink: str
    node_ip: str = "10.77.0.1"
    remote_ip: str = "10.77.0.2"
    gateway_net: str = "10.77.9.0/24"  # routed via the remote node: not a local pod
    node_ip6: str = "fd77::1"
    remote_ip6: str = "fd77::2"
    pods: dict[str, Pod] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in [self.remote, *(pod.netns for pod in self.pods.values()), self.node]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def ip(self, netns: str, *args: str) -> str:
        out = subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ip -n {netns} {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def tc(self, *args: str) -> str:
        out = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.node}", "tc", *args], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"tc {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def spawn(self, netns: str, *argv: str, ready: str = "READY") -> subprocess.Popen[bytes]:
        """Start a process inside ``netns`` (nsenter keeps /sys, hence bpffs, as it is) and wait for its banner."""
        proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{netns}", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        seen = ""
        for _ in range(5):
            line = proc.stdout.readline().decode()
            seen += line
            if ready in line:
                return proc
            if not line:
                break
        proc.kill()
        raise RuntimeError(f"{argv} in {netns} did not start: {seen}{proc.stdout.read().decode()}")

    def probe_server(self, netns: str, *args: str) -> subprocess.Popen[bytes]:
        return self.spawn(netns, sys.executable, "-m", "tests.support.tcp_probe", *args)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(5)
        self.procs.remove(proc)


@contextlib.contextmanager
def enter(netns: str) -> Iterator[None]:
    """Switch the calling thread into ``netns`` and back (sockets made inside stay bound to it)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        setns(target)
        yield
    finally:
        setns(back)
        os.close(back)
        os.close(target)


@dataclass
class RedirectorEnv:
    """A started Redirector on a topology's node, with a stand-in for the agent's listeners there."""

    topo: Topology
    config: RedirectConfig
    r: Redirector
    listener: subprocess.Popen[bytes] | None = None

    @property
    def pa(self) -> Pod:
        return self.topo.pods["pa"]

    def listen(self, *args: str) -> None:
        """The agent's stand-in (``serve --transparent`` with ``args``: its ports and options) in place of the
        previous one; no args: no listener at all, the agent is away."""
        if self.listener is not None:
            self.topo.stop(self.listener)
            self.listener = None
        if args:
            self.listener = self.topo.probe_server(self.topo.node, "serve", "--transparent", *args)

    def nft(self, *args: str, script: str | None = None) -> str:
        return nft_in(self.topo.node, *args, script=script)


def take_down(topo: Topology, redirector: Redirector, config: RedirectConfig) -> None:
    """Close the redirector, remove what its instance left in the node netns (pins, filters, the DNAT table), and
    take the topology down, the last even when the others fail."""
    try:
        redirector.close()
        with enter(topo.node):
            cleanup(config)
    finally:
        topo.down()


def up(pods: tuple[str, ...] = ("pa", "pb", "pc")) -> Topology:
    prefix = "ambit-" + secrets.token_hex(2)
    short = "r" + prefix[-4:]  # interface names: r<hex4><suffix>, well under 15 characters
    topo = Topology(prefix=prefix, node=f"{prefix}-node", remote=f"{prefix}-remote", uplink=f"{short}u")
    try:
        for ns in (topo.node, topo.remote):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            topo.ip(ns, "link", "set", "lo", "up")
        forwarding = ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        subprocess.run(
            ["ip", "netns", "exec", topo.node, "sysctl", "-qw", *forwarding],
            check=True,
            capture_output=True,
        )
        topo.ip(topo.node, "link", "add", topo.uplink, "type", "veth", "peer", "name", "eth0", "netns", topo.remote)
        topo.ip(topo.node, "addr", "add", f"{topo.node_ip}/24", "dev", topo.uplink)
        topo.ip(topo.node, "link", "set", topo.uplink, "up")
        topo.ip(topo.remote, "addr", "add", f"{topo.remote_ip}/24", "dev", "eth0")
        topo.ip(topo.remote, "link", "set", "eth0", "up")
        topo.ip(topo.remote, "route", "add", "default", "via", topo.node_ip)
        topo.ip(topo.node, "route", "add", topo.gateway_net, "via", topo.remote_ip)
        topo.ip(topo.node, "addr", "add", f"{topo.node_ip6}/64", "dev", topo.uplink, "nodad")
        topo.ip(topo.remote, "addr", "add", f"{topo.remote_ip6}/64", "dev", "eth0", "nodad")
        topo.ip(topo.remote, "-6", "route", "add", "default", "via", topo.node_ip6)
        for i, name in enumerate(pods, start=1):
            pod = Pod(name, f"{prefix}-{name}", f"10.77.{i}.10", f"{short}{name[-1]}", f"fd77:{i}::10")
            subprocess.run(["ip", "netns", "add", pod.netns], check=True)
            topo.pods[name] = pod
            topo.ip(pod.netns, "link", "set", "lo", "up")
            topo.ip(topo.node, "link", "add", pod.node_if, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
            topo.ip(topo.node, "addr", "add", f"10.77.{i}.1/24", "dev", pod.node_if)
            topo.ip(topo.node, "link", "set", pod.node_if, "up")
            topo.ip(pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
            topo.ip(pod.netns, "link", "set", "eth0", "up")
            topo.ip(pod.netns, "route", "add", "default", "via", f"10.77.{i}.1")
            topo.ip(topo.node, "addr", "add", f"fd77:{i}::1/64", "dev", pod.node_if, "nodad")
            topo.ip(pod.netns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
            topo.ip(pod.netns, "-6", "route", "add", "default", "via", f"fd77:{i}::1")
    except Exception:
        topo.down()
        raise
    return topo


def connect(
    netns: str,
    ip: str,
    port: int,
    *,
    src_port: int = 0,
    src_ip: str = "",
    timeout: float = 5.0,
    sockopts: tuple[tuple[int, int, bytes], ...] = (),
) -> str:
    """Connect from ``netns`` and return the first line the peer sends; raises OSError/TimeoutError on failure."""
    with enter(netns):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        for level, opt, value in sockopts:
            s.setsockopt(level, opt, value)
        s.settimeout(timeout)
        if src_port or src_ip:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((src_ip or ("::" if ":" in ip else "0.0.0.0"), src_port))
        s.connect((ip, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        # Let the peer close first (a tproxy probe closes actively, so its side holds the TIME_WAIT).
        with contextlib.suppress(OSError):
            while s.recv(4096):
                pass
        return data.decode().strip()
    finally:
        s.close()


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


@contextlib.contextmanager
def captured_by_hand(
    node_netns: str, pod_netns: str, port: int, dst: str
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A pod's connection to ``dst``:8080 accepted by a transparent stand-in for the agent's outbound listener on
    ``port`` in the node netns (the caller has capture steer it there): (the pod's socket, the agent-side one)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with enter(node_netns):
        listener = socket.socket(family, socket.SOCK_STREAM)
        with enter(pod_netns):
            client = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
        else:
            listener.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: as the agent's outbound listener
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        listener.listen(4)
        listener.settimeout(5)
        client.settimeout(5)
        client.connect((dst, 8080))
        agent_side, _ = listener.accept()
        with agent_side:
            agent_side.settimeout(2.0)
            yield client, agent_side
    finally:
        client.close()
        listener.close()
