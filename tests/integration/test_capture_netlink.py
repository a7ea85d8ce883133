"""Capture's netlink requests against the real kernel, in a namespace of the test's own."""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from agent.redirect_netlink import F_DUMP, RTM_GETQDISC, ChangeWatch, Netlink
from tests.support import redirect_topology as rt


class _Recording:
    """The Netlink object's socket, keeping the header (type, flags) of every request it sends."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sent: list[tuple[int, int]] = []

    def send(self, data: bytes) -> int:
        _, mtype, flags = struct.unpack_from("=IHH", data)
        self.sent.append((mtype, flags))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def netns() -> Iterator[str]:
    name = "ambit-" + secrets.token_hex(2) + "-nl"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_has_clsact_asks_for_one_interface_not_a_dump(netns: str) -> None:
    def tc(*args: str) -> None:
        subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", *args], check=True)

    for n in range(5):  # a node with pods with qdiscs of their own
        subprocess.run(["ip", "-n", netns, "link", "add", f"p{n}", "type", "veth", "peer", "name", f"q{n}"], check=True)
        tc("add", "dev", f"p{n}", "clsact")
    subprocess.run(["ip", "-n", netns, "link", "add", "ca", "type", "veth", "peer", "name", "cb"], check=True)
    with rt.enter(netns):
        nl = Netlink()
    try:
        index = nl.link_index("ca")
        assert index is not None
        recording = _Recording(nl.sock)
        nl.sock = recording  # type: ignore[assignment]
        assert nl.has_clsact(index) is False  # never had an ingress-side qdisc
        tc("add", "dev", "ca", "clsact")
        assert nl.has_clsact(index) is True
        tc("del", "dev", "ca", "clsact")
        assert nl.has_clsact(index) is False  # deleted: the kernel keeps a placeholder it does not report
        tc("add", "dev", "ca", "ingress")
        assert nl.has_clsact(index) is False  # an ingress qdisc is not a clsact
        assert nl.has_clsact(index + 1000) is False  # no such interface
        assert recording.sent and all(mtype == RTM_GETQDISC and not flags & F_DUMP for mtype, flags in recording.sent)
    finally:
        nl.close()


def test_the_change_watch_ignores_what_captures_own_requests_cause(netns: str) -> None:
    """The kernel answers a qdisc get with a notification to every tc listener (NLM_F_ECHO only adds a copy for the
    asker): has_clsact woke the agent's own change watch, so a reconcile whose attach kept failing asked for the
    next one, without end. Other processes' changes still wake it."""
    subprocess.run(["ip", "-n", netns, "link", "add", "ca", "type", "veth", "peer", "name", "cb"], check=True)
    subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "ca", "clsact"], check=True)
    with rt.enter(netns):
        nl = Netlink()
        watch = ChangeWatch(own_port=nl.port)
    try:
        index = nl.link_index("ca")
        assert index is not None
        watch.drain()
        assert nl.has_clsact(index) is True
        assert watch.drain() is False  # the get's notification names our own port
        subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "cb", "clsact"], check=True)
        assert watch.drain() is True  # someone else's
    finally:
        watch.close()
        nl.close()
