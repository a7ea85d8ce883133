"""agent.pod_netns against the real kernel: namespaces of our own, each with a veth link holding test addresses.

Which netns a socket lives in is read from the socket itself (ioctl SIOCGSKNS returns an fd of its netns), not
inferred from the address, so a socket made in the wrong namespace cannot pass.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.pod_netns import PodNetnsConfig, PodNetworks
from lab import netns

SIOCGSKNS = 0x894C


@dataclass
class Namespaces:
    prefix: str
    made: list[str] = field(default_factory=list)

    def add(self, name: str, *addresses: str) -> str:
        """A netns `name` (under the prefix unless it starts with "!"), `addresses` on a veth link in it (veth:
        this kernel has no dummy module)."""
        full = name[1:] if name.startswith("!") else self.prefix + name
        self.made.append(full)
        netns.add(full)
        netns.batch(full, ["link add d0 type veth peer name d1", "link set d1 up", "link set d0 up"])
        for a in addresses:
            self.address(full, a)
        return full

    def address(self, full: str, addr: str, *, delete: bool = False) -> None:
        if delete:
            netns.ip("addr", "del", addr, "dev", "d0", netns=full)
        elif ":" in addr:  # nodad: a tentative address cannot be bound yet
            netns.ip("addr", "add", f"{addr}/128", "dev", "d0", "nodad", netns=full)
        else:
            netns.ip("addr", "add", f"{addr}/32", "dev", "d0", netns=full)


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    made = Namespaces(prefix=f"ambit-pnt-{secrets.token_hex(3)}-")
    try:
        yield made
    finally:
        errors = []
        for name in made.made:
            try:
                netns.delete(name)
            except Exception as e:
                errors.append(f"{name}: {e}")
        assert not errors, errors


@pytest.fixture
def nets(spaces: Namespaces) -> Iterator[PodNetworks]:
    pods = PodNetworks(PodNetnsConfig(prefix=spaces.prefix))
    try:
        yield pods
    finally:
        pods.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def netns_inode(sock: socket.socket) -> int:
    """The inode of the netns `sock` was created in, from the socket itself."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS, 0)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def inode_of(name: str) -> int:
    return os.stat(netns.path(name)).st_ino


def thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_socket_is_made_in_the_netns_holding_the_address_and_bound_there(
    spaces: Namespaces, nets: PodNetworks
) -> None:
    a = spaces.add("a", "10.251.1.1")
    b = spaces.add("b", "10.251.1.2")
    spaces.add("c")
    home = thread_netns()
    for ip, name in [("10.251.1.1", a), ("10.251.1.2", b), ("10.251.1.1", a)]:
        sock = nets.bound_socket(ip)
        assert sock is not None, ip
        with sock:
            assert netns_inode(sock) == inode_of(name)
            host, port = sock.getsockname()
            assert (host, sock.family, sock.type) == (ip, socket.AF_INET, socket.SOCK_STREAM)
            assert port > 0
            assert sock.getblocking() is False
        assert thread_netns() == home
    assert len(nets) == 2


def test_an_address_in_no_netns_is_none_and_the_miss_is_remembered_for_the_interval(
    spaces: Namespaces, monkeypatch: pytest.MonkeyPatch
) -> None:
    spaces.add("a", "10.251.2.1")
    clock = Clock()
    pods = PodNetworks(PodNetnsConfig(prefix=spaces.prefix, rescan_interval=1.0), clock=clock)
    scans: list[str] = []
    real_scan = pods._scan

    def spy(ip: str, family: int) -> socket.socket | None:
        scans.append(ip)
        return real_scan(ip, family)

    monkeypatch.setattr(pods, "_scan", spy)
    home = thread_netns()
    try:
        assert pods.bound_socket("10.251.2.9") is None
        clock.now += 0.5
        assert pods.bound_socket("10.251.2.9") is None
        assert scans == ["10.251.2.9"]
        clock.now += 0.6
        assert pods.bound_socket("10.251.2.9") is None
        assert scans == ["10.251.2.9"] * 2
        assert thread_netns() == home
        assert len(pods) == 0
    finally:
        pods.close()


def test_a_miss_is_found_after_the_interval_when_the_address_appears(spaces: Namespaces) -> None:
    a = spaces.add("a")
    clock = Clock()
    pods = PodNetworks(PodNetnsConfig(prefix=spaces.prefix, rescan_interval=1.0), clock=clock)
    try:
        assert pods.bound_socket("10.251.3.1") is None
        spaces.address(a, "10.251.3.1")
        assert pods.bound_socket("10.251.3.1") is None  # still remembered as a miss
        clock.now += 1.0
        sock = pods.bound_socket("10.251.3.1")
        assert sock is not None
        with sock:
            assert netns_inode(sock) == inode_of(a)
    finally:
        pods.close()


def test_a_netns_outside_the_prefix_is_never_used(spaces: Namespaces, nets: PodNetworks) -> None:
    spaces.add("a", "10.251.4.1")
    spaces.add(f"!ambit-pnx-{secrets.token_hex(3)}", "10.251.4.2")
    assert nets.bound_socket("10.251.4.2") is None
    assert len(nets) == 0


def test_a_netns_that_binds_any_address_is_not_trusted(spaces: Namespaces, nets: PodNetworks) -> None:
    """net.ipv4.ip_nonlocal_bind=1 makes every bind succeed there: that says nothing about where the pod is."""
    loose = spaces.add("loose")
    netns.write_sysctl(loose, "net.ipv4.ip_nonlocal_bind", "1")
    with netns.enter(loose), socket.socket() as probe:
        probe.bind(("10.251.5.1", 0))  # the premise: any address binds in `loose`
    assert nets.bound_socket("10.251.5.1") is None
    assert len(nets) == 0


def test_an_address_that_moved_is_found_in_its_new_netns(spaces: Namespaces, nets: PodNetworks) -> None:
    a = spaces.add("a", "10.251.6.1")
    c = spaces.add("c")
    home = thread_netns()
    sock = nets.bound_socket("10.251.6.1")
    assert sock is not None
    sock.close()
    spaces.address(a, "10.251.6.1/32", delete=True)
    spaces.address(c, "10.251.6.1")
    sock = nets.bound_socket("10.251.6.1")
    assert sock is not None
    with sock:
        assert netns_inode(sock) == inode_of(c)
    assert len(nets) == 1
    assert thread_netns() == home


def test_an_ipv6_address_and_both_families_of_one_pod(spaces: Namespaces, nets: PodNetworks) -> None:
    a = spaces.add("a", "10.251.7.1", "fd00:251::71")
    b = spaces.add("b", "fd00:251::72")
    for ip, name in [("fd00:251::72", b), ("10.251.7.1", a), ("fd00:251::71", a)]:
        sock = nets.bound_socket(ip)
        assert sock is not None, ip
        with sock:
            assert netns_inode(sock) == inode_of(name)
            assert sock.family == (socket.AF_INET6 if ":" in ip else socket.AF_INET)
            assert sock.getsockname()[:1] == (ip,)
            assert sock.getsockname()[1] > 0
    assert len(nets) == 2


def test_the_thread_comes_back_after_a_netns_it_cannot_enter(spaces: Namespaces, tmp_path: Path) -> None:
    """A file in the dirs that is no netns (setns: EINVAL) is skipped; the real one is still found."""
    a = spaces.add("a", "10.251.8.1")
    (tmp_path / f"{spaces.prefix}bogus").write_text("")
    pods = PodNetworks(PodNetnsConfig(dirs=(str(tmp_path), str(netns.NETNS_DIR)), prefix=spaces.prefix))
    home = thread_netns()
    try:
        sock = pods.bound_socket("10.251.8.1")
        assert sock is not None
        with sock:
            assert netns_inode(sock) == inode_of(a)
        assert thread_netns() == home
        assert pods.bound_socket("10.251.8.2") is None
        assert thread_netns() == home
        assert len(pods) == 1
    finally:
        pods.close()


def test_a_bind_error_other_than_a_missing_address_is_raised_with_the_thread_back_home(
    spaces: Namespaces, nets: PodNetworks
) -> None:
    a = spaces.add("a", "10.251.9.1")
    netns.write_sysctl(a, "net.ipv4.ip_local_port_range", "40000 40000")
    first = nets.bound_socket("10.251.9.1")
    assert first is not None
    home = thread_netns()
    with first, pytest.raises(OSError) as raised:
        nets.bound_socket("10.251.9.1")
    assert raised.value.errno == errno.EADDRINUSE
    assert thread_netns() == home


def test_forget_close_and_a_deleted_netns_release_their_fds(spaces: Namespaces) -> None:
    spaces.add("a", "10.251.10.1", "fd00:251::a1")
    b = spaces.add("b", "10.251.10.2")
    spaces.add("c", "10.251.10.3")
    before = open_fds()
    pods = PodNetworks(PodNetnsConfig(prefix=spaces.prefix))
    assert open_fds() == before + 1  # its own netns
    for ip in ["10.251.10.1", "fd00:251::a1", "10.251.10.2", "10.251.10.3"]:
        sock = pods.bound_socket(ip)
        assert sock is not None
        sock.close()
    assert len(pods) == 3
    assert open_fds() == before + 4
    pods.forget("10.251.10.1")  # a still holds the IPv6 address
    assert (len(pods), open_fds()) == (3, before + 4)
    pods.forget("fd00:251::a1")
    assert (len(pods), open_fds()) == (2, before + 3)
    netns.delete(b)  # the pod went away with no forget: the next scan lets its namespace go
    assert pods.bound_socket("10.251.10.9") is None
    assert (len(pods), open_fds()) == (1, before + 2)
    pods.close()
    assert (len(pods), open_fds()) == (0, before)
