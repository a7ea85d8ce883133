"""Capture with the real kernel program: one node netns with three pods and a remote node behind the uplink.

The program is compiled once for the module (the restart test compiles a second one, as a restarted agent does).
A transparent probe listener in the node netns stands in for the agent; plain probe servers run in the pods. Tests
set the enrollment they need first, so their order only matters for the last two (restart, cleanup).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import functools
import os
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.redirect import (
    RedirectCompileError,
    RedirectConfig,
    RedirectConfigError,
    Redirector,
    RedirectPinError,
    cleanup,
)
from agent.redirect_maps import (
    ALL_MAPS,
    CONFIG,
    LAYOUT_VERSION,
    WORKLOADS,
    ConfigEntry,
    PinnedMap,
    RedirectMaps,
    WlCounters,
    pack_addr,
    possible_cpus,
)
from agent.redirect_netlink import Netlink
from tests.support import redirect_topology as rt

IPV6_HOPOPTS = 54
MAP_TYPE_NAMES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 9: "lru_hash"}
LISTENER_PORTS = ("--port", "15001", "--port", "15006", "--port", "15008")


@dataclass
class Env(rt.RedirectorEnv):
    gone: set[str] = field(default_factory=set)  # pods whose interface a test deleted

    @property
    def pb(self) -> rt.Pod:
        return self.topo.pods["pb"]

    @property
    def pc(self) -> rt.Pod:
        return self.topo.pods["pc"]

    def all_pods(self) -> set[str]:
        return {p.ip for p in self.topo.pods.values() if p.name not in self.gone}

    def start_listener(self, *extra: str) -> None:
        self.listen(*LISTENER_PORTS, *extra)

    def stop_listener(self) -> None:
        self.listen()

    def filters(self, ifname: str) -> str:
        return self.topo.tc("filter", "show", "dev", ifname, "ingress")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    topo = rt.up(("pa", "pb", "pc", "pd"))
    config = RedirectConfig(instance=topo.prefix, uplinks=(topo.uplink,))
    r = Redirector(config)
    e = Env(topo, config, r)
    try:
        with rt.enter(topo.node):
            r.start()
        for pod in topo.pods.values():
            topo.probe_server(pod.netns, "serve", "--dual", "--port", "8080")
        e.start_listener()
        yield e
    finally:
        rt.take_down(topo, e.r, config)


def _tc_prog_id(env: Env, ifname: str) -> int:
    m = re.search(r"ambit:\S+ direct-action .*? id (\d+)", env.filters(ifname))
    assert m, env.filters(ifname)
    return int(m.group(1))


def test_enrolled_pod_is_captured_to_outbound_with_original_destination(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    got = rt.connect(env.pa.netns, env.pb.ip, 8080)
    assert got.startswith("tproxy:15001 ")
    assert f"orig={env.pb.ip}:8080" in got
    assert f"peer={env.pa.ip}:" in got
    assert env.r.counters()[env.pa.ip].connections_out >= 1


def test_non_enrolled_pods_are_untouched(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    # pc -> pb: neither end enrolled; pc's veth carries the program (peer mode) but the packet goes its own way.
    assert rt.connect(env.pc.netns, env.pb.ip, 8080).startswith(f"server:8080 local={env.pb.ip}:8080")
    assert rt.connect(env.topo.remote, env.pb.ip, 8080).startswith("server:8080")
    assert set(env.r.counters()) == {env.pa.ip}


def test_same_node_call_from_non_enrolled_pod_goes_to_inbound(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    got = rt.connect(env.pc.netns, env.pa.ip, 8080)
    assert got.startswith("tproxy:15006 ") and f"orig={env.pa.ip}:8080" in got and f"peer={env.pc.ip}:" in got
    # The enrolled pod's 15008 is the agent's HBONE listener from a same-node caller too (a waypoint, an east-west
    # gateway), as from the uplink: the plaintext listener would relay its TLS to a closed pod port.
    hbone = rt.connect(env.pc.netns, env.pa.ip, 15008)
    assert hbone.startswith("tproxy:15008 ") and f"orig={env.pa.ip}:15008" in hbone and f"peer={env.pc.ip}:" in hbone


def test_uplink_captures_hbone_and_plaintext_for_enrolled_pods_only(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    hbone = rt.connect(env.topo.remote, env.pa.ip, 15008)
    assert hbone.startswith("tproxy:15008 ") and f"orig={env.pa.ip}:15008" in hbone
    plain = rt.connect(env.topo.remote, env.pa.ip, 8080)
    assert plain.startswith("tproxy:15006 ") and f"peer={env.topo.remote_ip}:" in plain
    with pytest.raises(ConnectionRefusedError):  # pb is not enrolled: its own (closed) port 15008 answers
        rt.connect(env.topo.remote, env.pb.ip, 15008)
    assert rt.connect(env.topo.remote, env.pb.ip, 8080).startswith("server:8080")


def test_ipv6_capture_and_fail_closed_without_an_ipv6_listener(env: Env) -> None:
    pa, pb = env.pa, env.pb
    env.r.reconcile({pa.ip, pa.ip6}, env.all_pods() | {p.ip6 for p in env.topo.pods.values()})
    drops = env.r.stats()["drop_no_listener"]
    with pytest.raises(OSError):  # the stand-in listens on IPv4 only, like the agent: IPv6 fails closed
        rt.connect(pa.netns, pb.ip6, 8080, timeout=1.2)
    assert env.r.stats()["drop_no_listener"] > drops
    assert rt.connect(pa.netns, pb.ip, 8080).startswith("tproxy:15001 ")
    env.start_listener("--dual")
    try:
        out = rt.connect(pa.netns, pb.ip6, 8080)
        assert out.startswith("tproxy:15001 ") and f"orig=[{pb.ip6}]:8080" in out and f"peer=[{pa.ip6}]:" in out
        # TCP behind an IPv6 extension header (hop-by-hop, PadN) is still found and captured.
        hop_by_hop = ((socket.IPPROTO_IPV6, IPV6_HOPOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0])),)
        behind = rt.connect(pa.netns, pb.ip6, 8080, sockopts=hop_by_hop)
        assert behind.startswith("tproxy:15001 ") and f"orig=[{pb.ip6}]:8080" in behind
        hbone = rt.connect(env.topo.remote, pa.ip6, 15008)
        assert hbone.startswith("tproxy:15008 ") and f"orig=[{pa.ip6}]:15008" in hbone
        assert rt.connect(env.topo.remote, pb.ip6, 8080).startswith(f"server:8080 local=[{pb.ip6}]:8080")
        assert env.r.counters()[pa.ip6].connections_out >= 1
    finally:
        env.start_listener()
        env.r.reconcile({pa.ip}, env.all_pods())


def test_live_enroll_and_unenroll(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    assert rt.connect(env.pb.netns, env.pc.ip, 8080).startswith("server:8080")
    env.r.reconcile({env.pa.ip, env.pb.ip}, env.all_pods())
    assert rt.connect(env.pb.netns, env.pc.ip, 8080).startswith("tproxy:15001 ")
    env.r.reconcile(set(), env.all_pods())
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("server:8080")
    assert rt.connect(env.topo.remote, env.pa.ip, 8080).startswith("server:8080")
    for pod in env.topo.pods.values():  # nothing enrolled: no pod interface carries the program any more
        assert "ambit:" not in env.filters(pod.node_if)
    assert env.r.counters() == {}
    assert env.r.status()["ready"] is True  # nothing requested, nothing to capture
    env.r.reconcile({env.pa.ip}, env.all_pods())
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")


def test_filter_removed_behind_our_back_is_restored(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    env.topo.tc("qdisc", "del", "dev", env.pa.node_if, "clsact")  # e.g. a CNI resetting the interface
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("server:8080")
    assert env.r.reconcile({env.pa.ip}, env.all_pods()) == {}
    assert "ambit:" in env.filters(env.pa.node_if)
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")


def _free_port(netns: str, ip: str) -> int:
    with rt.enter(netns):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def test_the_agents_own_syn_from_inside_a_pod_passes_only_for_its_tuple(env: Env) -> None:
    """agent/inpod.py: the agent's passthrough connects from inside the pod, and its SYN crosses the pod's veth like
    the pod's own. Written into ambit_agent_conns, that one tuple is forwarded by the node (the server sees the pod);
    the same port to another destination, or the tuple once forgotten, is captured as the pod's."""
    env.r.reconcile({env.pa.ip}, env.all_pods())
    pa, pb = env.pa, env.pb
    port = _free_port(pa.netns, pa.ip)
    passed = env.r.stats()["pass_agent"]
    assert env.r.allow_agent_conn((pa.ip, port), (pb.ip, 8080))
    try:
        direct = rt.connect(pa.netns, pb.ip, 8080, src_ip=pa.ip, src_port=port)
        assert direct.startswith(f"server:8080 local={pb.ip}:8080"), direct
        assert f"peer={pa.ip}:{port}" in direct, direct
        assert env.r.stats()["pass_agent"] > passed
        other_port = rt.connect(pa.netns, pb.ip, 8081, src_ip=pa.ip, src_port=port, timeout=2)
        assert other_port.startswith("tproxy:15001 ") and f"orig={pb.ip}:8081" in other_port, other_port
    finally:
        env.r.forget_agent_conn((pa.ip, port), (pb.ip, 8080))
    later = _free_port(pa.netns, pa.ip)
    assert env.r.allow_agent_conn((pa.ip, later), (pb.ip, 8080))
    env.r.forget_agent_conn((pa.ip, later), (pb.ip, 8080))
    assert rt.connect(pa.netns, pb.ip, 8080, src_ip=pa.ip, src_port=later).startswith("tproxy:15001 ")


def test_the_agents_own_syns_are_asked_only_for_an_enrolled_pod_at_home(env: Env) -> None:
    """The entry is no pass for another pod: pc sending as pa with the allowed tuple is dropped as spoofed."""
    env.r.reconcile({env.pa.ip}, env.all_pods())
    pa, pb = env.pa, env.pb
    port = _free_port(pa.netns, pa.ip)
    assert env.r.allow_agent_conn((pa.ip, port), (pb.ip, 8080))
    try:
        spoofed = env.r.stats()["drop_spoofed"]
        with _borrowed(env, env.pc.netns, pa.ip), pytest.raises(OSError):  # pc forging pa's allowed tuple
            rt.connect(env.pc.netns, pb.ip, 8080, src_ip=pa.ip, src_port=port, timeout=1.2)
        assert env.r.stats()["drop_spoofed"] > spoofed
    finally:
        env.r.forget_agent_conn((pa.ip, port), (pb.ip, 8080))


def test_fail_closed_without_listener_and_fail_open_switch(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    drops_before = env.r.stats()["drop_no_listener"]
    wl_drops_before = env.r.counters()[env.pa.ip].drops
    env.stop_listener()
    try:
        with pytest.raises(OSError):  # SYNs dropped: never sent to pb in plaintext
            rt.connect(env.pa.netns, env.pb.ip, 8080, timeout=1.2)
        assert env.r.stats()["drop_no_listener"] > drops_before
        assert env.r.counters()[env.pa.ip].drops > wl_drops_before
        with pytest.raises(OSError):  # inbound plaintext to an enrolled pod is not let through either
            rt.connect(env.topo.remote, env.pa.ip, 8080, timeout=1.2)
        env.r.set_fail_open(True)
        assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("server:8080")
        assert env.r.stats()["pass_no_listener"] >= 1
    finally:
        env.r.set_fail_open(False)
        env.start_listener()
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")


def test_time_wait_4_tuple_reuse(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    port = 42000 + os.getpid() % 1000
    # The probe listener closes first, so the node-side socket of the first connection sits in TIME_WAIT when the
    # pod reuses the exact 4-tuple; the program must hand the SYN to that TIME_WAIT socket.
    first = rt.connect(env.pa.netns, env.pb.ip, 8080, src_port=port)
    assert first.startswith("tproxy:15001 ") and f"peer={env.pa.ip}:{port}" in first
    time.sleep(0.2)
    time_wait = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{env.topo.node}", "ss", "-tan", "state", "time-wait"],
        capture_output=True,
        text=True,
    ).stdout
    assert f"{env.pa.ip}:{port}" in time_wait, time_wait
    second = rt.connect(env.pa.netns, env.pb.ip, 8080, src_port=port, timeout=3)
    assert second.startswith("tproxy:15001 ") and f"peer={env.pa.ip}:{port}" in second
    # Released while the node still holds that TIME_WAIT: the forwarded connection must not be blackholed (TCP
    # early demux would attach the TIME_WAIT socket and ip_forward drop the packet; capture turns it off).
    env.r.reconcile(set(), env.all_pods())
    try:
        third = rt.connect(env.pa.netns, env.pb.ip, 8080, src_port=port, timeout=3)
        assert third.startswith(f"server:8080 local={env.pb.ip}:8080 peer={env.pa.ip}:{port}")
        assert _sysctl(env.topo.node, "net.ipv4.tcp_early_demux") == "0"
        assert _sysctl(env.topo.remote, "net.ipv4.tcp_early_demux") == "1"
    finally:
        env.r.reconcile({env.pa.ip}, env.all_pods())


def _sysctl(netns: str, key: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-n", key], capture_output=True, text=True)
    return out.stdout.strip()


def test_source_preserving_return_path(env: Env) -> None:
    env.start_listener("--relay")
    try:
        env.r.reconcile({env.pa.ip}, env.all_pods())
        # Outbound: the relay connects to pb from pa's own address; pb's veth (peer mode) returns the replies.
        out = rt.connect(env.pa.netns, env.pb.ip, 8080, timeout=4)
        assert out.startswith("relayed:15001 server:8080") and f"peer={env.pa.ip}:" in out
        # Inbound from the remote node: pa sees the remote client's address, pa's veth returns the replies.
        inb = rt.connect(env.topo.remote, env.pa.ip, 8080, timeout=4)
        assert inb.startswith("relayed:15006 server:8080") and f"peer={env.topo.remote_ip}:" in inb
        # Without pb in local_ips its veth has no program to hand pb's replies to the relay, but the DNAT table
        # still does: the node's OUTPUT saw the relay's connection leave from pa's (enrolled) address and marked it
        # in conntrack, and its replies are delivered locally (capture_dnat: the reply rule).
        env.r.reconcile({env.pa.ip})
        assert "ambit:" not in env.filters(env.pb.node_if)
        again = rt.connect(env.pa.netns, env.pb.ip, 8080, timeout=6)
        assert again.startswith("relayed:15001 server:8080") and f"peer={env.pa.ip}:" in again, again
    finally:
        env.start_listener()
        env.r.reconcile({env.pa.ip}, env.all_pods())


_COUNTER_SRC = r"""
BPF_HASH(seen, u32, u64, 64);
int count(struct __sk_buff *skb) {
    u32 k = skb->ingress_ifindex;
    u64 zero = 0, *v = seen.lookup_or_try_init(&k, &zero);
    if (v) __sync_fetch_and_add(v, 1);
    return TC_ACT_UNSPEC;
}
"""


def test_coexists_with_other_tc_filters(env: Env) -> None:
    from bcc import BPF

    b = BPF(text=("#include <uapi/linux/pkt_cls.h>\n" + _COUNTER_SRC).encode())
    fn = b.load_func(b"count", BPF.SCHED_CLS)
    with rt.enter(env.topo.node):
        ipr = IPRoute()
    placed = ((env.pa, 20), (env.pc, 5))  # after ours on the enrolled pod's veth, before ours on a peer's
    try:
        idx = {p: ipr.link_lookup(ifname=p.node_if)[0] for p in (env.pa, env.pc)}
        env.r.reconcile(set(), env.all_pods())  # start from no capture: the foreign filters come first
        for pod, prio in placed:
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx[pod])):
                ipr.tc("add", "clsact", index=idx[pod])
            ipr.tc(
                "add-filter", "bpf", index=idx[pod], handle=1, fd=fn.fd, name="counter", parent=0xFFFFFFF2,
                classid=1, direct_action=True, prio=prio,
            )  # fmt: skip
        env.r.reconcile({env.pa.ip}, env.all_pods())

        def seen(pod: rt.Pod) -> int:
            v = b[b"seen"].get(ct.c_uint32(idx[pod]))
            return int(v.value) if v else 0

        # Enrolled pa: captured TCP ends classification in ours; its UDP is not ours and reaches the next filter.
        assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")
        before = seen(env.pa)
        with rt.enter(env.pa.netns):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            for _ in range(5):
                udp.sendto(b"x", (env.pb.ip, 9999))
        rt.wait_for(lambda: seen(env.pa) >= before + 5)
        # A filter before ours that continues (TC_ACT_UNSPEC) does not stop capture on the peer's veth.
        before_pc = seen(env.pc)
        assert rt.connect(env.pc.netns, env.pa.ip, 8080).startswith("tproxy:15006 ")
        assert rt.connect(env.pc.netns, env.pb.ip, 8080).startswith("server:8080")
        assert seen(env.pc) > before_pc
        env.r.reconcile(set(), env.all_pods())  # detaching ours leaves theirs and the shared clsact
        for pod in (env.pa, env.pc):
            shown = env.filters(pod.node_if)
            assert "counter" in shown and "ambit:" not in shown
        before = seen(env.pa)
        assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("server:8080")
        assert seen(env.pa) > before
    finally:
        for pod, prio in placed:
            ipr.tc("del-filter", "bpf", index=idx[pod], handle=1, parent=0xFFFFFFF2, prio=prio)
        ipr.close()
        b.cleanup()
        env.r.reconcile({env.pa.ip}, env.all_pods())


def test_bad_pods_are_reported_and_others_keep_working(env: Env) -> None:
    gateway_ip = env.topo.gateway_net.replace("0/24", "5")
    bad = {"10.99.99.99", gateway_ip, env.topo.node_ip, "not-an-ip", "fd00::5"}
    failures = env.r.reconcile({env.pa.ip, *bad}, env.all_pods())
    assert set(failures) == bad
    assert "no route to 10.99.99.99" in failures["10.99.99.99"]
    assert f"via gateway {env.topo.remote_ip} on {env.topo.uplink}" in failures[gateway_ip]
    assert "local address of the node" in failures[env.topo.node_ip]
    assert "not an IP address" in failures["not-an-ip"]
    assert "no route to fd00::5" in failures["fd00::5"]
    assert env.r.status()["failures"] == failures
    assert set(env.r.counters()) == {env.pa.ip}
    assert env.r.ready
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")


def test_deleted_pod_interface_is_forgotten(env: Env) -> None:
    pd = env.topo.pods["pd"]
    env.r.reconcile({env.pa.ip, pd.ip}, env.all_pods())
    assert rt.connect(pd.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")
    maps = RedirectMaps.open(env.config.pin_dir)
    try:
        pd_index = env.r.status()["interfaces"][pd.node_if]["ifindex"]
        env.topo.ip(env.topo.node, "link", "del", pd.node_if)  # the pod went away before the controller said so
        env.gone.add(pd.name)
        failures = env.r.reconcile({env.pa.ip, pd.ip}, env.all_pods())
        assert set(failures) == {pd.ip} and "no route" in failures[pd.ip]
        assert pd.node_if not in env.r.status()["interfaces"]
        assert pd_index not in maps.iface_entries()
        assert maps.workload_ips() == {env.pa.ip}
    finally:
        maps.close()
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")
    assert env.r.reconcile({env.pa.ip}, env.all_pods()) == {}


def test_attach_conflict_leaves_no_half_attached_state(env: Env) -> None:
    from bcc import BPF

    b = BPF(text=b"#include <uapi/linux/pkt_cls.h>\nint other(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }")
    fn = b.load_func(b"other", BPF.SCHED_CLS)
    with rt.enter(env.topo.node):
        ipr = IPRoute()
    idx = ipr.link_lookup(ifname=env.pb.node_if)[0]
    env.r.reconcile({env.pa.ip})  # pb's veth free of ours
    if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx)):
        ipr.tc("add", "clsact", index=idx)
    ipr.tc(
        "add-filter", "bpf", index=idx, handle=env.config.tc_handle, fd=fn.fd, name="foreign", parent=0xFFFFFFF2,
        classid=1, direct_action=True, prio=env.config.tc_priority,
    )  # fmt: skip
    try:
        watch = env.r.change_watch
        assert watch is not None
        watch.drain()
        failures = env.r.reconcile({env.pa.ip, env.pb.ip})
        assert "taken by another filter" in failures[env.pb.ip] and env.pb.node_if in failures[env.pb.ip]
        assert watch.drain() is False  # the failed attach does not ask for the next reconcile (one more failure)
        assert set(env.r.counters()) == {env.pa.ip}  # pb not enrolled in the map: the uplink won't capture for it
        maps = RedirectMaps.open(env.config.pin_dir)
        try:
            assert idx not in maps.iface_entries()
        finally:
            maps.close()
        assert "foreign" in env.filters(env.pb.node_if)
        assert rt.connect(env.topo.remote, env.pb.ip, 8080).startswith("server:8080")
        assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")
    finally:
        ipr.tc("del", "clsact", index=idx)
        ipr.close()
        b.cleanup()
        env.r.reconcile({env.pa.ip}, env.all_pods())


@contextlib.contextmanager
def _borrowed(env: Env, netns: str, *addrs: str) -> Iterator[None]:
    """Give a pod extra addresses (another pod's, to send as it); removed again however the test ends."""
    for addr in addrs:
        env.topo.ip(netns, "addr", "add", f"{addr}/{128 if ':' in addr else 32}", "dev", "eth0", "nodad")
    try:
        yield
    finally:
        for addr in addrs:
            env.topo.ip(netns, "addr", "del", f"{addr}/{128 if ':' in addr else 32}", "dev", "eth0")


def _forged_ack(netns: str, src: str, dst: str, dport: int) -> None:
    """One bare TCP ACK from ``src`` (a raw socket: as if injected into an established connection of ``src``)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    with rt.enter(netns):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw:
        raw.sendto(ip + tcp, (dst, 0))


def test_a_pod_sending_as_another_enrolled_pod_is_dropped_and_counted(env: Env) -> None:
    pa, pb, pc = env.pa, env.pb, env.pc
    enrolled = {pa.ip, pb.ip, pa.ip6, pb.ip6}
    env.start_listener("--dual")
    try:
        assert env.r.reconcile(enrolled, env.all_pods() | {p.ip6 for p in env.topo.pods.values()}) == {}
        with _borrowed(env, pa.netns, pb.ip, pb.ip6), _borrowed(env, pc.netns, pa.ip):
            stats, victim = env.r.stats(), env.r.counters()[pb.ip]
            # pa as pb, over IPv4 and IPv6: without the check these were captured as pb's (pb's certificate).
            for src, dst in ((pb.ip, pc.ip), (pb.ip6, pc.ip6)):
                with pytest.raises(OSError):
                    rt.connect(pa.netns, dst, 8080, src_ip=src, timeout=1.0)
            # pc (not enrolled; its veth carries the program for same-node calls) as the enrolled pa.
            with pytest.raises(OSError):
                rt.connect(pc.netns, pb.ip, 8080, src_ip=pa.ip, timeout=1.0)
            spoofed = env.r.stats()["drop_spoofed"]
            assert spoofed >= stats["drop_spoofed"] + 3
            # Not only SYNs: a forged segment of one of pb's connections never reaches the agent's sockets.
            _forged_ack(pa.netns, pb.ip, pc.ip, 8080)
            rt.wait_for(lambda: env.r.stats()["drop_spoofed"] > spoofed)
            after = env.r.stats()
            assert after["capture_outbound"] == stats["capture_outbound"]  # nothing of it was captured
            assert after["capture_inbound"] == stats["capture_inbound"]
            assert env.r.counters()[pb.ip] == victim  # nor counted as pb's traffic
            # And the offenders are named: the drops are counted against the interface they came from.
            by_if = env.r.spoofed_drops()
            assert by_if[pa.node_if] >= 3 and by_if[pc.node_if] >= 1 and pb.node_if not in by_if, by_if
            assert sum(by_if.values()) == after["drop_spoofed"] - stats["drop_spoofed"]
            assert env.r.status()["interfaces"][pa.node_if]["spoofed_drops"] == by_if[pa.node_if]
            # Each pod's own traffic is captured as before, the borrowed addresses notwithstanding.
            for netns, src, dst in ((pa.netns, pa.ip, pc.ip), (pa.netns, pa.ip6, pc.ip6), (pb.netns, pb.ip, pc.ip)):
                got = rt.connect(netns, dst, 8080, src_ip=src)
                peer = f"[{src}]" if ":" in src else src
                assert got.startswith("tproxy:15001 ") and f"peer={peer}:" in got, got
            assert env.r.stats()["capture_outbound"] == after["capture_outbound"] + 3
        # A source that is no enrolled workload keeps today's way: pa as the non-enrolled pc calling pb is a
        # plaintext call from pc (inbound, no identity), neither outbound as pa nor dropped; the answer goes to
        # the real pc, which resets it, so the handshake never completes.
        before = env.r.stats()
        with _borrowed(env, pa.netns, pc.ip), pytest.raises(OSError):
            rt.connect(pa.netns, pb.ip, 8080, src_ip=pc.ip, timeout=1.0)
        final = env.r.stats()
        assert final["capture_inbound"] > before["capture_inbound"]
        assert final["drop_spoofed"] == before["drop_spoofed"]
        assert final["capture_outbound"] == before["capture_outbound"]
    finally:
        env.start_listener()
        env.r.reconcile({pa.ip}, env.all_pods())


def test_a_recycled_pod_address_follows_its_new_interface(env: Env) -> None:
    """pb's IPv4 address handed to a pod behind pc's veth (an address reused by a new pod): the next reconcile
    moves its home, so the new owner is captured as that workload and pb's interface (still enrolled through pb's
    IPv6 address) may no longer send from it."""
    pb, pc = env.pb, env.pc
    enrolled, local = {pb.ip, pb.ip6}, env.all_pods() | {pb.ip6}
    env.r.reconcile(enrolled, local)
    maps = RedirectMaps.open(env.config.pin_dir)
    try:
        index = {name: iface["ifindex"] for name, iface in env.r.status()["interfaces"].items()}
        assert maps.workload_homes() == {pb.ip: index[pb.node_if], pb.ip6: index[pb.node_if]}
        env.topo.ip(env.topo.node, "route", "add", f"{pb.ip}/32", "dev", pc.node_if)
        try:
            with _borrowed(env, pc.netns, pb.ip):
                assert env.r.reconcile(enrolled, local) == {}
                assert maps.workload_homes() == {pb.ip: index[pc.node_if], pb.ip6: index[pb.node_if]}
                got = rt.connect(pc.netns, env.pa.ip, 8080, src_ip=pb.ip)
                assert got.startswith("tproxy:15001 ") and f"peer={pb.ip}:" in got
                before = env.r.stats()["drop_spoofed"]
                with pytest.raises(OSError):
                    rt.connect(pb.netns, env.pa.ip, 8080, timeout=1.0)
                assert env.r.stats()["drop_spoofed"] > before
        finally:
            env.topo.ip(env.topo.node, "route", "del", f"{pb.ip}/32", "dev", pc.node_if)
        assert env.r.reconcile({env.pa.ip}, env.all_pods()) == {}
        assert maps.workload_homes() == {env.pa.ip: env.r.status()["interfaces"][env.pa.node_if]["ifindex"]}
    finally:
        maps.close()


# --- hand-made frames: what a pod with CAP_NET_RAW (a default capability) or a host on the uplink's L2 can send ---

ETH_P_ALL = 0x0003
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8


def _csum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcp_packet(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
    """An IPv4 or IPv6 packet carrying one TCP segment, checksums right (the receiving stack checks them)."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    s, d = socket.inet_pton(family, src), socket.inet_pton(family, dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    v6 = family == socket.AF_INET6
    pseudo = s + d + (struct.pack("!I3xB", len(tcp), 6) if v6 else struct.pack("!xBH", 6, len(tcp)))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64) + s + d + tcp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0, s, d)
    return ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:] + tcp


def _mac(netns: str, ifname: str) -> bytes:
    with rt.enter(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with s:
        s.bind((ifname, 0))
        return bytes(s.getsockname()[4])


def _send_frame(netns: str, ifname: str, dst_mac: bytes, packet: bytes, tpids: tuple[int, ...] = ()) -> None:
    """One Ethernet frame out of ``ifname``, behind a VLAN header (VID 0, a priority tag) per TPID in ``tpids``."""
    ethertype = 0x86DD if packet[0] >> 4 == 6 else 0x0800
    tags = b"".join(struct.pack("!HH", tpid, 0) for tpid in tpids)
    with rt.enter(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with s:
        s.bind((ifname, 0))
        s.send(dst_mac + bytes(s.getsockname()[4]) + tags + struct.pack("!H", ethertype) + packet)


@contextlib.contextmanager
def _sniffer(netns: str, ifname: str = "eth0") -> Iterator[Callable[[bytes, float], bool]]:
    """``seen(marker, timeout)``: whether a frame containing ``marker`` arrived at ``ifname`` in ``netns`` since the
    sniffer opened, or arrives within ``timeout`` (frames are kept, so several markers can be looked for)."""
    with rt.enter(netns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    frames: list[bytes] = []

    def seen(marker: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not any(marker in frame for frame in frames):
            if (left := deadline - time.monotonic()) <= 0:
                return False
            s.settimeout(left)
            try:
                frame, addr = s.recvfrom(65535)
            except TimeoutError:
                return False
            if addr[2] != socket.PACKET_OUTGOING:
                frames.append(frame)
        return True

    with s:
        yield seen


def test_vlan_stacked_frames_cannot_slip_past_capture(env: Env) -> None:
    """The kernel strips one VLAN header before tc ingress, and after it every further VID-0 header, so a frame with
    two priority tags reaches IP routing while the program sees only a VLAN EtherType. Such TCP concerning an
    enrolled workload is dropped (fail closed), on a pod interface and on the uplink; anyone else's still passes."""
    pa, pb, pc, topo = env.pa, env.pb, env.pc, env.topo
    env.r.reconcile({pa.ip, pa.ip6}, env.all_pods() | {p.ip6 for p in topo.pods.values()})
    try:
        # Two and three headers are read through; six leave more than the program reads (its addresses unknown).
        stacks = ((ETH_P_8021AD, ETH_P_8021Q), (ETH_P_8021Q,) * 3, (ETH_P_8021Q,) * 6)
        cases = [  # (from netns, out of, toward the MAC of, source, receiver netns, destination, enrolled end)
            (pa.netns, "eth0", (topo.node, pa.node_if), pa.ip, pb.netns, pb.ip, True),  # outbound capture bypass
            (pa.netns, "eth0", (topo.node, pa.node_if), pa.ip6, pb.netns, pb.ip6, True),
            (pc.netns, "eth0", (topo.node, pc.node_if), pc.ip, pa.netns, pa.ip, True),  # same-node inbound bypass
            (topo.remote, "eth0", (topo.node, topo.uplink), topo.remote_ip, pa.netns, pa.ip, True),  # uplink
            (topo.remote, "eth0", (topo.node, topo.uplink), topo.remote_ip6, pa.netns, pa.ip6, True),
            (pc.netns, "eth0", (topo.node, pc.node_if), pc.ip, pb.netns, pb.ip, False),  # not the mesh's: passes
        ]
        unparsed = env.r.stats()["unparsed"]
        leaked: list[tuple[str, str, tuple[int, ...]]] = []
        blocked: list[tuple[str, str, tuple[int, ...]]] = []
        sent: list[tuple[Callable[[bytes, float], bool], bytes, bool, tuple[str, str, tuple[int, ...]]]] = []
        with _sniffer(pa.netns) as at_pa, _sniffer(pb.netns) as at_pb:
            for n, (netns, ifname, (mac_ns, mac_if), src, rx, dst, mesh) in enumerate(cases):
                for tpids in stacks if mesh else stacks[:2]:
                    sport = 41000 + n * 10 + len(tpids)
                    _send_frame(netns, ifname, _mac(mac_ns, mac_if), _tcp_packet(src, dst, sport, 8080, n, 0, 2), tpids)
                    marker = struct.pack("!HHI", sport, 8080, n)
                    sent.append((at_pa if rx == pa.netns else at_pb, marker, mesh, (src, dst, tpids)))
            settle = time.monotonic() + 0.5  # one wait for every frame that must not arrive
            for seen, marker, mesh, what in sent:
                if mesh and seen(marker, settle - time.monotonic()):
                    leaked.append(what)
                if not mesh and not seen(marker, 2.0):
                    blocked.append(what)
        assert leaked == [], f"TCP of enrolled workloads delivered uncaptured behind VLAN headers: {leaked}"
        assert blocked == [], f"TCP between non-enrolled ends no longer delivered: {blocked}"
        assert env.r.stats()["unparsed"] >= unparsed + 5 * len(stacks)
    finally:
        env.r.reconcile({pa.ip}, env.all_pods())


TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2


def _next_seqs(sock: socket.socket) -> tuple[int, int]:
    """(next sequence number ``sock`` expects, next one it sends): what an off-path injector has to guess."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        seqs = []
        for queue in (TCP_RECV_QUEUE, TCP_SEND_QUEUE):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            seqs.append(sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    return seqs[0], seqs[1]


def test_uplink_packets_from_an_enrolled_local_address_are_dropped(env: Env) -> None:
    """An enrolled pod's packets enter the node at its own interface, never at the uplink. Taken from the uplink, a
    segment sent as pa to enrolled pb was handed (bpf_sk_assign) to the agent's socket of pa's same-node connection,
    where its bytes count as pa's (pa's identity and policy decision, spliced on to pb): a host off the node could
    write into a stream the mesh vouches for, where without the program the segment was only forwarded to pb."""
    pa, pb, topo = env.pa, env.pb, env.topo
    env.r.reconcile({pa.ip, pb.ip}, env.all_pods())
    env.stop_listener()
    with rt.enter(topo.node):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with rt.enter(pa.netns):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Loose or no reverse-path filtering on the uplink (what CNIs with asymmetric pod routes need, and the default).
    rp = [f"net.ipv4.conf.{ifname}.rp_filter" for ifname in ("all", topo.uplink)]
    saved = [_sysctl(topo.node, key) for key in rp]
    try:
        subprocess.run(["ip", "netns", "exec", topo.node, "sysctl", "-qw", *(f"{k}=0" for k in rp)], check=True)
        listener.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: the agent's outbound listener
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", env.config.outbound_port))
        listener.listen(4)
        listener.settimeout(5)
        client.settimeout(5)
        client.connect((pb.ip, 8080))  # captured: pa's same-node call, as the agent sees it
        agent_side, _ = listener.accept()
        with agent_side:
            agent_side.settimeout(1.0)
            client.sendall(b"from pa\n")
            assert agent_side.recv(100) == b"from pa\n"
            expected, acked = _next_seqs(agent_side)
            sport = client.getsockname()[1]
            spoofed, by_if = env.r.stats()["drop_spoofed"], env.r.spoofed_drops().get(topo.uplink, 0)
            segment = _tcp_packet(pa.ip, pb.ip, sport, 8080, expected, acked, 0x18, b"injected\n")  # PSH|ACK
            _send_frame(topo.remote, "eth0", _mac(topo.node, topo.uplink), segment)
            with pytest.raises(TimeoutError):
                got = agent_side.recv(100)
                pytest.fail(f"the agent's socket took a segment from the uplink as pa's: {got!r}")
            # A SYN from the uplink as pa is not taken for a plaintext caller either.
            inbound = env.r.stats()["capture_inbound"]
            _send_frame(
                topo.remote, "eth0", _mac(topo.node, topo.uplink), _tcp_packet(pa.ip, pb.ip, 41999, 8080, 7, 0, 2)
            )
            rt.wait_for(lambda: env.r.stats()["drop_spoofed"] >= spoofed + 2)
            assert env.r.stats()["capture_inbound"] == inbound
            assert env.r.spoofed_drops()[topo.uplink] == by_if + 2
            client.sendall(b"still pa\n")  # the real pa is unaffected
            assert agent_side.recv(100) == b"still pa\n"
    finally:
        client.close()
        listener.close()
        subprocess.run(
            ["ip", "netns", "exec", topo.node, "sysctl", "-qw", *(f"{k}={v}" for k, v in zip(rp, saved, strict=True))],
            check=True,
        )
        env.start_listener()
        env.r.reconcile({pa.ip}, env.all_pods())


def _fragments(packet: bytes, first: int, later_next: int = socket.IPPROTO_TCP) -> list[bytes]:
    """An IPv4 or IPv6 packet as two fragments (identification 0x4242), the first carrying ``first`` payload bytes.
    ``later_next``: the next header the IPv6 later fragment's fragment header names (reassembly ignores it)."""
    v6 = packet[0] >> 4 == 6
    header, payload = (packet[:40], packet[40:]) if v6 else (packet[:20], packet[20:])
    out = []
    for offset, chunk, more in ((0, payload[:first], 1), (first, payload[first:], 0)):
        if v6:  # the fragment header after the fixed one: next header, offset in 8-byte units, M flag, id
            fragment = struct.pack("!BBHI", later_next if offset else socket.IPPROTO_TCP, 0, offset | more, 0x4242)
            h = header[:4] + struct.pack("!HBB", 8 + len(chunk), 44, 64) + header[8:40]
            out.append(h + fragment + chunk)
            continue
        h = header[:2] + struct.pack("!HHH", 20 + len(chunk), 0x4242, more << 13 | offset // 8) + header[8:10]
        h += b"\0\0" + header[12:20]
        out.append(h[:10] + struct.pack("!H", _csum(h)) + h[12:] + chunk)
    return out


@contextlib.contextmanager
def _captured_connection(env: Env, dst: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """pa's connection to ``dst``:8080, captured to a transparent stand-in for the agent's outbound listener (pa and
    pa's IPv6 address enrolled): (pa's socket, the agent-side socket). Capture and the listener are restored after."""
    pa, topo = env.pa, env.topo
    env.r.reconcile({pa.ip, pa.ip6}, env.all_pods() | {p.ip6 for p in topo.pods.values()})
    env.stop_listener()
    try:
        with rt.captured_by_hand(topo.node, pa.netns, env.config.outbound_port, dst) as pair:
            yield pair
    finally:
        env.start_listener()
        env.r.reconcile({pa.ip}, env.all_pods())


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_ip_fragments_of_a_captured_connection_reach_its_socket(env: Env, family: socket.AddressFamily) -> None:
    """A later IP fragment carries no TCP header: it was not ours, so it was forwarded on to the pod while the first
    fragment went to the agent's socket, whose reassembly then waited forever (the connection stalled)."""
    pa, pb, topo = env.pa, env.pb, env.topo
    src, dst = (pa.ip6, pb.ip6) if family == socket.AF_INET6 else (pa.ip, pb.ip)
    with _captured_connection(env, dst) as (client, agent_side):
        expected, sent = _next_seqs(client)
        data = bytes(range(256)) * 4
        segment = _tcp_packet(src, dst, client.getsockname()[1], 8080, sent, expected, 0x18, data)
        for fragment in _fragments(segment, 512):  # as a pod's stack sends TCP with PMTU discovery off
            _send_frame(pa.netns, "eth0", _mac(topo.node, pa.node_if), fragment)
        assert _recv_exactly(agent_side, len(data)) == data


@pytest.mark.parametrize(
    ("family", "later_next"),
    [
        (socket.AF_INET, socket.IPPROTO_TCP),
        (socket.AF_INET6, socket.IPPROTO_TCP),
        (socket.AF_INET6, socket.IPPROTO_UDP),
    ],
)
def test_a_later_fragment_sent_as_another_enrolled_pod_is_dropped(
    env: Env, family: socket.AddressFamily, later_next: int
) -> None:
    """Anti-spoofing covered whole TCP segments only. A later fragment carries no TCP header, yet it completes any
    datagram of the same addresses and identification in the node's reassembly (IPv6 ignores a later fragment's next
    header, so it need not even say TCP): pc sent pa's later fragment from its own interface and its bytes reached
    pa's captured connection, as pa's. Here pa calls the node's own address, which the node reassembles whatever the
    mark; where conntrack defragments in PREROUTING (kube-proxy nodes) any destination does."""
    pa, pc, topo = env.pa, env.pc, env.topo
    src, dst = (pa.ip6, topo.node_ip6) if family == socket.AF_INET6 else (pa.ip, topo.node_ip)
    with _captured_connection(env, dst) as (client, agent_side):
        expected, sent = _next_seqs(client)
        data = b"pa" * 256 + b"pc" * 256
        segment = _tcp_packet(src, dst, client.getsockname()[1], 8080, sent, expected, 0x18, data)
        first, later = _fragments(segment, 512, later_next)
        spoofed = env.r.spoofed_drops().get(pc.node_if, 0)
        _send_frame(pa.netns, "eth0", _mac(topo.node, pa.node_if), first)
        _send_frame(pc.netns, "eth0", _mac(topo.node, pc.node_if), later)  # pc forges the rest of pa's datagram
        agent_side.settimeout(1.0)
        with pytest.raises(TimeoutError):
            agent_side.recv(4096)  # without the check: pa's first half and pc's second, as one segment of pa's
        rt.wait_for(lambda: env.r.spoofed_drops().get(pc.node_if, 0) > spoofed)
        # pa's own later fragment still completes its datagram.
        agent_side.settimeout(2.0)
        _send_frame(pa.netns, "eth0", _mac(topo.node, pa.node_if), later)
        assert _recv_exactly(agent_side, len(data)) == data


def _replug(env: Env, pod: rt.Pod) -> None:
    """A new veth pair for ``pod`` with its old names and addresses: a pod sandbox re-created with the same IP."""
    topo, gw, gw6 = env.topo, pod.ip.rsplit(".", 1)[0] + ".1", pod.ip6.rsplit(":", 1)[0] + ":1"
    topo.ip(topo.node, "link", "add", pod.node_if, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
    topo.ip(topo.node, "addr", "add", f"{gw}/24", "dev", pod.node_if)
    topo.ip(topo.node, "addr", "add", f"{gw6}/64", "dev", pod.node_if, "nodad")
    topo.ip(topo.node, "link", "set", pod.node_if, "up")
    topo.ip(pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
    topo.ip(pod.netns, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
    topo.ip(pod.netns, "link", "set", "eth0", "up")
    topo.ip(pod.netns, "route", "add", "default", "via", gw)
    topo.ip(pod.netns, "-6", "route", "add", "default", "via", gw6)


def test_a_pod_interface_re_created_with_its_ip_is_noticed(env: Env) -> None:
    """The controller sees nothing when a pod's sandbox comes back with the same IP, yet the new veth carries no
    program: the pod's TCP went uncaptured (plaintext, no policy, no anti-spoofing) until an unrelated config change
    made the agent reconcile. The redirector's change watch reports it, and a reconcile captures the pod again."""
    pa, pc, topo = env.pa, env.pc, env.topo
    enrolled = {pa.ip, pc.ip}
    env.r.reconcile(enrolled, env.all_pods())
    watch = env.r.change_watch
    assert watch is not None
    old_index = env.r.status()["interfaces"][pc.node_if]["ifindex"]
    try:
        watch.drain()
        # A routing daemon's prefixes come and go all the time: no reconcile for them.
        topo.ip(topo.node, "route", "add", "10.99.0.0/16", "via", topo.remote_ip)
        topo.ip(topo.node, "route", "del", "10.99.0.0/16", "via", topo.remote_ip)
        assert watch.drain() is False
        topo.ip(topo.node, "link", "del", pc.node_if)
        _replug(env, pc)
        assert rt.connect(pc.netns, env.pb.ip, 8080).startswith("server:8080")  # the hazard: not captured
        assert select.select([watch], [], [], 3.0)[0] and watch.drain() is True
        assert env.r.reconcile(enrolled, env.all_pods()) == {}  # what the agent does when the watch reports
        got = rt.connect(pc.netns, env.pb.ip, 8080)
        assert got.startswith("tproxy:15001 ") and f"peer={pc.ip}:" in got
        new_index = env.r.status()["interfaces"][pc.node_if]["ifindex"]
        maps = RedirectMaps.open(env.config.pin_dir)
        try:
            assert new_index != old_index and maps.workload_homes()[pc.ip] == new_index
            assert old_index not in maps.iface_entries()
        finally:
            maps.close()
    finally:
        env.r.reconcile({pa.ip}, env.all_pods())


def test_a_reused_address_is_held_until_the_controller_confirms_its_workload(env: Env) -> None:
    """Identity is keyed by IP. When a pod goes and a new sandbox gets its IP (a new veth) before the controller has
    caught up, the agent's config still names the old workload: the new pod was captured as that workload, with its
    certificate, and got its inbound traffic. With owner tokens (uid@version) the redirector holds such an address
    (enrolled, no home): nothing of the new pod's TCP goes out and connections to it cannot complete, until the
    token changes. The usual order, old veth deleted and a reconcile before the new one exists, is covered."""
    pa, pc = env.pa, env.pc
    enrolled = {pa.ip, pc.ip}
    owners = {pa.ip: "pod-a@1", pc.ip: "pod-c@1"}
    env.start_listener("--relay")
    try:
        failures = _recreate_sandbox(env, enrolled, owners)
        spoofed = env.r.stats()["drop_spoofed"]
        with pytest.raises(OSError):  # not captured as pod-c (nor sent anywhere)
            rt.connect(pc.netns, env.pb.ip, 8080, timeout=1.0)
        # A call to it is captured as usual, but the agent's connection to it never completes.
        assert rt.connect(pa.netns, pc.ip, 8080, timeout=6).startswith("relay-failed:15001")
        assert env.r.stats()["drop_spoofed"] > spoofed
        assert "held" in failures[pc.ip] and env.r.status()["held"] == [pc.ip]
        assert env.r.reconcile(enrolled, env.all_pods(), owners)[pc.ip] == failures[pc.ip]  # still held
        # The controller names the new pod: captured as it from now on.
        assert env.r.reconcile(enrolled, env.all_pods(), owners | {pc.ip: "pod-e@1"}) == {}
        assert env.r.status()["held"] == []
        got = rt.connect(pc.netns, env.pb.ip, 8080, timeout=4)
        assert got.startswith("relayed:15001 server:8080") and f"peer={pc.ip}:" in got, got
    finally:
        env.start_listener()
        env.r.reconcile({pa.ip}, env.all_pods())


def _recreate_sandbox(env: Env, enrolled: set[str], owners: dict[str, str]) -> dict[str, str]:
    """pc's veth deleted (a reconcile sees it go, as the change watch makes it), then a new one with the same IP
    while the config still names pod-c; returns the failures of the reconcile after it."""
    pc, topo = env.pc, env.topo
    assert env.r.reconcile(enrolled, env.all_pods(), owners) == {}
    topo.ip(topo.node, "link", "del", pc.node_if)
    assert pc.ip in env.r.reconcile(enrolled, env.all_pods(), owners)
    _replug(env, pc)
    return env.r.reconcile(enrolled, env.all_pods(), owners)


def test_a_held_address_is_released_when_its_hold_time_is_up(env: Env) -> None:
    """A sandbox re-created with its IP while nothing the controller sends changes (a static config, a pod whose
    status does not move) was cut off for good: the hold only ended with a new owner token. After
    reuse_hold_seconds it is captured as the workload named for it, and not held again for the same move."""
    pa, pc = env.pa, env.pc
    enrolled = {pa.ip, pc.ip}
    owners = {pa.ip: "pod-a@1", pc.ip: "pod-c@1"}
    env.r.config = dataclasses.replace(env.r.config, reuse_hold_seconds=1.0)
    env.start_listener("--relay")
    try:
        assert "held" in _recreate_sandbox(env, enrolled, owners)[pc.ip]
        expires = env.r.hold_expires_in()
        assert expires is not None and 0 < expires <= 1.0
        time.sleep(expires + 0.05)  # the agent's reconcile loop sets a timer for this moment
        assert env.r.reconcile(enrolled, env.all_pods(), owners) == {}
        assert env.r.status()["held"] == [] and env.r.hold_expires_in() is None
        got = rt.connect(pc.netns, env.pb.ip, 8080, timeout=4)
        assert got.startswith("relayed:15001 server:8080") and f"peer={pc.ip}:" in got, got
        assert env.r.reconcile(enrolled, env.all_pods(), owners) == {}  # not held again for the same move
    finally:
        env.r.config = dataclasses.replace(env.r.config, reuse_hold_seconds=30.0)
        env.start_listener()
        env.r.reconcile({pa.ip}, env.all_pods())


def test_observers_do_not_wait_for_a_reconcile(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics scrapes, readiness probes and /config_dump read the redirector on the agent's event loop. They took
    the lock a reconcile holds through all its netlink work, so while one ran (every pod or interface change) the
    whole data path stood still behind a scrape. They now read the maps and the last published state at once."""
    from agent.capture_metrics import CaptureCollector
    from agent.redirect_plan import classify_route

    inside, release = threading.Event(), threading.Event()

    def slow_route(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        release.wait(30)
        return classify_route(*args, **kwargs)

    env.r.reconcile({env.pa.ip}, env.all_pods())
    monkeypatch.setattr("agent.redirect.classify_route", slow_route)
    worker = threading.Thread(target=env.r.reconcile, args=({env.pa.ip}, env.all_pods()))
    worker.start()
    seen: dict[str, Any] = {}

    def observe() -> None:
        seen["ready"] = env.r.ready
        seen["status"] = env.r.status()
        seen["metrics"] = [m.name for m in CaptureCollector(env.r).collect()]

    try:
        assert inside.wait(10), "the reconcile never reached its route lookups"
        observer = threading.Thread(target=observe)
        observer.start()
        observer.join(10)  # a liveness bound: with the reconcile parked, a waiting observer would never finish
        assert not observer.is_alive(), "reading capture state waited for the reconcile in progress"
        assert seen["ready"] is True and env.pa.ip in seen["status"]["enrolled"]
        assert "ambit_capture_spoofed_drops" in seen["metrics"]
    finally:
        release.set()
        worker.join()
    monkeypatch.undo()
    assert env.r.reconcile({env.pa.ip}, env.all_pods()) == {}


def test_uplinks_of_multipath_and_nexthop_object_default_routes() -> None:
    """Nodes routed by BGP reach their routers over ECMP: the default route has hops (RTA_MULTIPATH) or names a
    nexthop object (RTA_NH_ID), never RTA_OIF. Every interface it leaves through is an uplink; reading RTA_OIF alone
    found none (the agent refused to start) or, with another family single-path, only some of them."""
    ns = "ambit-" + secrets.token_hex(2) + "-mp"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = functools.partial(subprocess.run, check=True, capture_output=True)
        for n, name in enumerate(("a", "b", "c"), start=1):
            run(["ip", "-n", ns, "link", "add", f"up{name}", "type", "veth", "peer", "name", f"up{name}p"])
            run(["ip", "-n", ns, "addr", "add", f"10.66.{n}.1/24", "dev", f"up{name}"])
            run(["ip", "-n", ns, "addr", "add", f"fd66:{n}::1/64", "dev", f"up{name}", "nodad"])
            for ifname in (f"up{name}", f"up{name}p"):
                run(["ip", "-n", ns, "link", "set", ifname, "up"])
        run(["ip", "-n", ns, "route", "add", "default",
             "nexthop", "via", "10.66.1.2", "dev", "upa", "nexthop", "via", "10.66.2.2", "dev", "upb"])  # fmt: skip
        run(["ip", "-n", ns, "nexthop", "add", "id", "11", "via", "fd66:3::2", "dev", "upc"])
        run(["ip", "-n", ns, "nexthop", "add", "id", "10", "group", "11"])
        run(["ip", "-n", ns, "-6", "route", "add", "default", "nhid", "10"])
        with rt.enter(ns):
            nl = Netlink()
        try:
            want = {nl.link_index(name) for name in ("upa", "upb", "upc")}
            assert set(nl.default_route_oifs()) == want
        finally:
            nl.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_the_nodes_tunnel_devices_are_uplinks(env: Env) -> None:
    """Overlay networks hand traffic to the node through tunnel devices (VXLAN, Geneve, IPIP, WireGuard) that are
    not the default route's interface, so they carried no program: TCP decapsulated there reached enrolled pods
    uncaptured (plaintext, no policy, any source address). Any pod can feed one with a plain UDP socket, no
    capability needed. Tunnel devices of the node netns now get the uplink role, found again at each reconcile
    (overlay agents create them at any time)."""
    pa, pb, pc, topo = env.pa, env.pb, env.pc, env.topo
    vx, vni = "r" + topo.prefix[-4:] + "x", 42
    env.r.reconcile({pa.ip, pb.ip}, env.all_pods())
    topo.ip(topo.node, "link", "add", vx, "type", "vxlan", "id", str(vni), "dstport", "4789")
    try:
        topo.ip(topo.node, "addr", "add", "10.66.0.1/24", "dev", vx)
        topo.ip(topo.node, "link", "set", vx, "up")
        assert env.r.reconcile({pa.ip, pb.ip}, env.all_pods()) == {}  # what the change watch asks for
        assert vx in env.r.status()["uplinks"]
        with rt.enter(pc.netns):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        before = env.r.stats()
        with udp:
            for n, src in enumerate(("10.66.0.2", pb.ip)):  # a source off the overlay, then enrolled pb's
                syn = _tcp_packet(src, pa.ip, 42000 + n, 8080, 0x7E550000 + n, 0, 0x02)
                frame = _mac(topo.node, vx) + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0800) + syn
                with _sniffer(pa.netns) as seen:
                    udp.sendto(struct.pack("!II", 0x08000000, vni << 8) + frame, ("10.77.3.1", 4789))
                    arrived = seen(struct.pack("!HHI", 42000 + n, 8080, 0x7E550000 + n), 0.5)
                assert not arrived, f"a SYN from {src} decapsulated on {vx} reached {pa.ip} uncaptured"
        after = env.r.stats()
        assert after["capture_inbound"] == before["capture_inbound"] + 1
        assert after["drop_spoofed"] == before["drop_spoofed"] + 1
        assert env.r.spoofed_drops()[vx] == 1
    finally:
        topo.ip(topo.node, "link", "del", vx)
        env.r.reconcile({pa.ip}, env.all_pods())
    assert vx not in env.r.status()["uplinks"]


def test_a_pod_the_controller_has_not_named_yet_is_captured_as_a_peer(env: Env) -> None:
    """Same-node calls to an enrolled pod are captured at the caller's interface, which got the program only once
    the controller listed the caller. A new pod (or one the controller never names) reached enrolled pods in
    plaintext, past their inbound policy, until then. Every interface holding a pod route (/32, /128, direct) now
    carries the program while anything local is enrolled."""
    pa, pc, topo = env.pa, env.pc, env.topo
    topo.ip(topo.node, "route", "add", f"{pc.ip}/32", "dev", pc.node_if)  # a pod route, as CNIs install them
    try:
        known = env.all_pods() - {pc.ip}  # the controller has not told the agent about pc yet
        assert env.r.reconcile({pa.ip}, known) == {}
        assert pc.node_if in env.r.status()["interfaces"]
        got = rt.connect(pc.netns, pa.ip, 8080)
        assert got.startswith("tproxy:15006 ") and f"peer={pc.ip}:" in got, got
        env.r.reconcile(set(), known)  # nothing enrolled: no program for pods nobody named
        assert pc.node_if not in env.r.status()["interfaces"]
    finally:
        topo.ip(topo.node, "route", "del", f"{pc.ip}/32", "dev", pc.node_if)
        env.r.reconcile({pa.ip}, env.all_pods())


# What a layout-1 agent left: no ambit_wl_home (nor the later maps), an 8-entry ambit_stats (no drop_spoofed).
LAYOUT_1 = {
    s.name: s.shape
    for s in ALL_MAPS
    if s.name not in ("ambit_wl_home", "ambit_if_spoofed", "ambit_bridge_ports", "ambit_agent_conns")
}
LAYOUT_1["ambit_stats"] = (6, 4, 8, 8)


def _pin_maps(pin_dir: str, shapes: dict[str, tuple[int, int, int, int]], config: ConfigEntry) -> None:
    os.makedirs(pin_dir)
    for name, (kind, key, value, entries) in shapes.items():
        subprocess.run(
            ["bpftool", "map", "create", f"{pin_dir}/{name}", "type", MAP_TYPE_NAMES[kind], "key", str(key),
             "value", str(value), "entries", str(entries), "name", name],
            check=True, capture_output=True,
        )  # fmt: skip
    pinned = PinnedMap.open(CONFIG, pin_dir)
    try:
        pinned.update(ct.c_uint32(0), config)
    finally:
        pinned.close()


def test_layout_1_pins_are_migrated_and_homes_filled_from_routes(env: Env) -> None:
    cfg = RedirectConfig(instance=env.topo.prefix + "-1", uplinks=(env.topo.uplink,), tc_handle=0xA3B4)
    node_netns = os.stat(f"/var/run/netns/{env.topo.node}").st_ino
    try:
        _pin_maps(cfg.pin_dir, LAYOUT_1, ConfigEntry(outbound_port=15001, layout_version=1, netns_cookie=node_netns))
        workloads = PinnedMap.open(WORKLOADS, cfg.pin_dir)
        try:
            workloads.update(pack_addr(env.pa.ip), WlCounters(packets=7))
        finally:
            workloads.close()
        r = Redirector(cfg)
        with rt.enter(env.topo.node):
            r.start()
        try:
            maps = RedirectMaps.open(cfg.pin_dir)  # every map in this agent's layout now
            try:
                pa_index = int(env.topo.ip(env.topo.node, "-o", "link", "show", env.pa.node_if).split(":")[0])
                assert maps.workload_homes() == {env.pa.ip: pa_index}
                assert maps.read_config().layout_version == LAYOUT_VERSION
                # Enrollment kept as it was, counters included (the 7 was written to every CPU's slot).
                assert maps.workload_counters()[env.pa.ip].packets == 7 * possible_cpus()
            finally:
                maps.close()
        finally:
            r.close()
    finally:
        with rt.enter(env.topo.node):
            cleanup(cfg)
    assert not os.path.exists(cfg.pin_dir)


def test_cleanup_reads_layout_1_pins(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    cfg = RedirectConfig(instance=env.topo.prefix + "-c", uplinks=(env.topo.uplink,))
    node_netns = os.stat(f"/var/run/netns/{env.topo.node}").st_ino
    try:
        _pin_maps(cfg.pin_dir, LAYOUT_1, ConfigEntry(layout_version=1, netns_cookie=node_netns))
        with rt.enter(env.topo.node):
            removed = cleanup(cfg)
        assert f"pins {cfg.pin_dir}" in removed
        assert "pins unreadable" not in caplog.text  # not the by-name fallback for pins it cannot read
    finally:
        shutil.rmtree(cfg.pin_dir, ignore_errors=True)


def test_pins_of_a_newer_layout_are_refused_and_left_alone(env: Env) -> None:
    cfg = RedirectConfig(instance=env.topo.prefix + "-3", uplinks=(env.topo.uplink,), tc_handle=0xA3B5)
    node_netns = os.stat(f"/var/run/netns/{env.topo.node}").st_ino
    shapes = {s.name: s.shape for s in ALL_MAPS}
    try:
        newer = LAYOUT_VERSION + 1
        _pin_maps(cfg.pin_dir, shapes, ConfigEntry(layout_version=newer, netns_cookie=node_netns))
        with (
            rt.enter(env.topo.node),
            pytest.raises(RedirectPinError, match=f"layout {newer}, newer than this agent's {LAYOUT_VERSION}"),
        ):
            Redirector(cfg).start()
        assert sorted(os.listdir(cfg.pin_dir)) == sorted(shapes)
        assert f"ambit:{cfg.instance}" not in env.filters(env.topo.uplink)
    finally:
        shutil.rmtree(cfg.pin_dir, ignore_errors=True)  # cleanup() refuses to read them too; pins are plain files


def test_compile_failures_are_precise_and_leave_nothing(env: Env, tmp_path: Path) -> None:
    up = (env.topo.uplink,)
    missing = RedirectConfig(instance=env.topo.prefix + "-m", source="/nonexistent/redirect.bpf.c", uplinks=up)
    with rt.enter(env.topo.node), pytest.raises(RedirectCompileError, match=r"/nonexistent/redirect\.bpf\.c"):
        Redirector(missing).start()
    assert not os.path.exists(missing.pin_dir)
    broken_src = tmp_path / "broken.bpf.c"
    broken_src.write_text("int ambit_tc_ingress(struct __sk_buff *skb) { return undeclared_thing; }\n")
    broken = RedirectConfig(instance=env.topo.prefix + "-b", source=str(broken_src), uplinks=up)
    with rt.enter(env.topo.node), pytest.raises(RedirectCompileError) as info:
        Redirector(broken).start()
    assert str(broken_src) in str(info.value) and "undeclared_thing" in str(info.value)
    assert not os.path.exists(broken.pin_dir)


def test_missing_uplink_fails_start_and_leaves_nothing(env: Env) -> None:
    cfg = RedirectConfig(instance=env.topo.prefix + "-u", uplinks=("nosuchif0",), route_table=101, rule_priority=101)
    with rt.enter(env.topo.node), pytest.raises(RedirectConfigError, match="'nosuchif0' does not exist"):
        Redirector(cfg).start()
    assert not os.path.exists(cfg.pin_dir)
    assert "lookup 101" not in env.topo.ip(env.topo.node, "rule")


def test_pins_of_another_node_are_refused(env: Env) -> None:
    same_instance = dataclasses.replace(env.config, uplinks=("eth0",))  # the remote node's own uplink
    with rt.enter(env.topo.remote), pytest.raises(RedirectPinError, match="another node"):
        Redirector(same_instance).start()


def test_pins_of_a_vanished_netns_are_replaced(env: Env) -> None:
    cfg = RedirectConfig(instance=env.topo.prefix + "-s", uplinks=(env.topo.uplink,), tc_handle=0xA3B2)
    os.makedirs(cfg.pin_dir)
    try:
        for spec in ALL_MAPS:  # what a node that was torn down without cleanup leaves behind
            subprocess.run(
                ["bpftool", "map", "create", f"{cfg.pin_dir}/{spec.name}", "type", MAP_TYPE_NAMES[spec.map_type],
                 "key", str(spec.key_size), "value", str(spec.value_size), "entries", str(spec.max_entries),
                 "name", spec.name],
                check=True, capture_output=True,
            )  # fmt: skip
        maps = RedirectMaps.open(cfg.pin_dir)
        stale = maps.read_config()
        stale.netns_cookie = 1  # inode 1: no network namespace has it
        maps.write_config(stale)
        maps.close()
        r = Redirector(cfg)
        with rt.enter(env.topo.node):
            r.start()
        try:
            assert r.status()["adopted"] == []
            assert "ambit:" + cfg.instance in env.filters(env.topo.uplink)
        finally:
            r.close()
    finally:
        with rt.enter(env.topo.node):
            cleanup(cfg)
    assert not os.path.exists(cfg.pin_dir)
    assert "0x200/0xf00" in env.topo.ip(env.topo.node, "rule")  # the module's instance keeps its routing


_NO_BCC_AGENT = """
import sys
from agent.redirect import RedirectConfig, Redirector, cleanup
from tests.support.redirect_topology import enter
cfg = RedirectConfig(instance=sys.argv[1], uplinks=(sys.argv[3],), tc_handle=0xA3B3)
with enter(sys.argv[2]):
    r = Redirector(cfg)
    r.start()
    ready = r.ready and r.status()["uplinks"] == [sys.argv[3]]
    mapped = open("/proc/self/maps").read()
    r.close()
    cleanup(cfg)
print(ready, "bcc" in sys.modules, "libbcc" in mapped, "libLLVM" in mapped, "libclang" in mapped)
"""


def test_capturing_process_never_loads_bcc_or_llvm(env: Env) -> None:
    """The memory fix: compile in the loader child, so the agent maps none of LLVM/clang (~130 MB resident)."""
    instance = env.topo.prefix + "-x"
    try:
        out = subprocess.run(
            [sys.executable, "-c", _NO_BCC_AGENT, instance, env.topo.node, env.topo.uplink],
            capture_output=True, text=True, cwd=rt.REPO, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "False", "False", "False", "False"]
    finally:
        with rt.enter(env.topo.node):
            cleanup(RedirectConfig(instance=instance))
    assert not os.path.exists(RedirectConfig(instance=instance).pin_dir)


def test_restart_adopts_pins_and_filters_without_gap(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")
    counted = env.r.counters()[env.pa.ip].connections_out
    old_prog = _tc_prog_id(env, env.pa.node_if)
    env.r.close()  # the agent exits: capture stays
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")

    results: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                results.append(rt.connect(env.pa.netns, env.pb.ip, 8080))
            except OSError as exc:
                results.append(f"error {exc!r}")

    t = threading.Thread(target=hammer)
    t.start()
    try:
        new = Redirector(env.config)
        with rt.enter(env.topo.node):
            new.start()
        env.r = new
        time.sleep(0.2)
    finally:
        stop.set()
        t.join()
    assert results and all(r.startswith("tproxy:15001 ") for r in results), results
    assert set(new.status()["adopted"]) >= {env.pa.node_if, env.topo.uplink}
    assert _tc_prog_id(env, env.pa.node_if) != old_prog  # swapped to the new program in place
    assert env.filters(env.pa.node_if).count("ambit:") == 1
    assert new.counters()[env.pa.ip].connections_out >= counted + len(results)
    assert new.reconcile({env.pa.ip}, env.all_pods()) == {}
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("tproxy:15001 ")


def test_cleanup_removes_filters_rules_and_pins(env: Env) -> None:
    env.r.reconcile({env.pa.ip}, env.all_pods())
    # A filter of ours left at another priority (an agent once ran with another tc_priority) goes too.
    lib = ct.CDLL("libbcc.so.0", use_errno=True)
    prog_fd = lib.bpf_prog_get_fd_by_id(_tc_prog_id(env, env.pa.node_if))
    assert prog_fd >= 0
    with rt.enter(env.topo.node):
        ipr = IPRoute()
    try:
        ipr.tc(
            "add-filter", "bpf", index=ipr.link_lookup(ifname=env.pb.node_if)[0], handle=7, fd=prog_fd,
            name=env.config.filter_name, parent=0xFFFFFFF2, classid=1, direct_action=True, prio=33,
        )  # fmt: skip
    finally:
        ipr.close()
        os.close(prog_fd)
    assert "pref 33" in env.filters(env.pb.node_if)
    env.r.close()
    with rt.enter(env.topo.node):
        removed = cleanup(env.config)
    assert any(env.topo.uplink in item for item in removed)
    for ifname in [env.topo.uplink, *(p.node_if for p in env.topo.pods.values() if p.name not in env.gone)]:
        assert "ambit:" not in env.filters(ifname)
    assert "0x200/0xf00" not in env.topo.ip(env.topo.node, "rule")
    assert env.topo.ip(env.topo.node, "route", "show", "table", str(env.config.route_table)).strip() == ""
    assert not os.path.exists(env.config.pin_dir)
    # Captured connections left TIME_WAIT sockets behind, so early demux stays off rather than blackholing them.
    restored = "net.ipv4.tcp_early_demux restored to 1" in removed
    assert _sysctl(env.topo.node, "net.ipv4.tcp_early_demux") == ("1" if restored else "0")
    assert rt.connect(env.pa.netns, env.pb.ip, 8080).startswith("server:8080")
    with rt.enter(env.topo.node):
        assert cleanup(env.config) == []  # repeatable: nothing left to remove
