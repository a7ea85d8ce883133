"""agent/inpod.py: the capture exemption brackets exactly the connect, and every reason not to connect from inside
the pod answers None before anything was sent (the caller then connects from the node)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import pytest

from agent import inpod
from agent.inpod import InPodConnector
from agent.pod_netns import PodNetnsConfig
from agent.redirect_errors import RedirectKernelError

Address = tuple[str, int]


class FakeNetworks:
    """PodNetworks with loopback standing in for a pod: a socket bound to (ip, 0) in our own namespace."""

    def __init__(self, known: set[str]) -> None:
        self.config = PodNetnsConfig(dirs=("/nowhere",))
        self.known = known
        self.asked: list[str] = []
        self.forgotten: list[str] = []
        self.closed = False

    def bound_socket(self, ip: str) -> socket.socket | None:
        self.asked.append(ip)
        if ip not in self.known:
            return None
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        s.bind((ip, 0))
        return s

    def forget(self, ip: str) -> None:
        self.forgotten.append(ip)

    def close(self) -> None:
        self.closed = True


class FakeCapture:
    def __init__(self, started: bool = True, fail: bool = False) -> None:
        self.started = started
        self.fail = fail
        self.allowed: set[tuple[Address, Address]] = set()
        self.log: list[str] = []

    def allow_agent_conn(self, src: Address, dst: Address) -> bool:
        if self.fail:
            raise RedirectKernelError("map update failed")
        if not self.started:
            return False
        self.allowed.add((src, dst))
        self.log.append("allow")
        return True

    def forget_agent_conn(self, src: Address, dst: Address) -> None:
        self.allowed.discard((src, dst))
        self.log.append("forget")


@pytest.fixture
def server() -> Iterator[Address]:
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        yield srv.getsockname()[:2]
    finally:
        srv.close()


def _connector(known: set[str], capture: FakeCapture) -> tuple[InPodConnector, FakeNetworks]:
    networks = FakeNetworks(known)
    return InPodConnector(networks, capture), networks  # type: ignore[arg-type]


def test_the_exemption_covers_the_connect_and_is_gone_after_it(server: Address) -> None:
    capture = FakeCapture()
    conn, _ = _connector({"127.0.0.1"}, capture)
    seen: list[set[tuple[Address, Address]]] = []
    orig = capture.allow_agent_conn

    def spy(src: Address, dst: Address) -> bool:
        ok = orig(src, dst)
        seen.append(set(capture.allowed))
        return ok

    capture.allow_agent_conn = spy  # type: ignore[method-assign]
    sock = asyncio.run(conn.connect("127.0.0.1", server, connect_timeout=5))
    assert sock is not None
    with sock:
        src = sock.getsockname()[:2]
        assert sock.getpeername()[:2] == server
    assert seen == [{(src, server)}], "the tuple written is the socket's own, before the connect"
    assert capture.allowed == set() and capture.log == ["allow", "forget"]


def test_a_failed_connect_still_forgets_the_tuple() -> None:
    capture = FakeCapture()
    conn, _ = _connector({"127.0.0.1"}, capture)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[:2]
    with pytest.raises(OSError):
        asyncio.run(conn.connect("127.0.0.1", closed, connect_timeout=5))
    assert capture.log == ["allow", "forget"] and capture.allowed == set()


def test_no_namespace_means_none_and_one_warning_per_pod(server: Address, caplog: pytest.LogCaptureFixture) -> None:
    capture = FakeCapture()
    conn, _ = _connector(set(), capture)
    with caplog.at_level(logging.WARNING, logger="agent.inpod"):
        assert asyncio.run(conn.connect("127.0.0.9", server, connect_timeout=5)) is None
        assert asyncio.run(conn.connect("127.0.0.9", server, connect_timeout=5)) is None
    warnings = [r for r in caplog.records if "namespace not found" in r.getMessage()]
    assert len(warnings) == 1
    assert capture.log == [], "nothing written for a socket that was never made"
    conn.retain(set())  # the pod left: a new pod at that address is warned about again
    with caplog.at_level(logging.WARNING, logger="agent.inpod"):
        assert asyncio.run(conn.connect("127.0.0.9", server, connect_timeout=5)) is None
    assert len([r for r in caplog.records if "namespace not found" in r.getMessage()]) == 2


@pytest.mark.parametrize("capture", [FakeCapture(started=False), FakeCapture(fail=True)], ids=["stopped", "error"])
def test_capture_that_cannot_let_the_syn_pass_means_none(server: Address, capture: FakeCapture) -> None:
    """Connecting anyway would have the pod's interface capture the agent's own SYN into its outbound listener."""
    conn, networks = _connector({"127.0.0.1"}, capture)
    assert asyncio.run(conn.connect("127.0.0.1", server, connect_timeout=5)) is None
    assert networks.asked == ["127.0.0.1"] and capture.allowed == set()


@pytest.mark.parametrize("target", [("::1", 80), ("fe80::1%3", 80)])
def test_another_family_or_a_zoned_destination_is_left_to_the_node(target: Address) -> None:
    capture = FakeCapture()
    conn, networks = _connector({"127.0.0.1"}, capture)
    assert asyncio.run(conn.connect("127.0.0.1", target, connect_timeout=5)) is None
    assert networks.asked == []


def test_retain_releases_the_namespaces_of_pods_that_left(server: Address) -> None:
    conn, networks = _connector({"127.0.0.1", "127.0.0.2"}, FakeCapture())
    for ip in ("127.0.0.1", "127.0.0.2"):
        sock = asyncio.run(conn.connect(ip, server, connect_timeout=5))
        assert sock is not None
        sock.close()
    conn.retain({"127.0.0.2"})
    assert networks.forgotten == ["127.0.0.1"]
    conn.retain({"127.0.0.2"})
    assert networks.forgotten == ["127.0.0.1"], "forgotten once"
    conn.close()
    assert networks.closed


def test_hbone_dials_from_inside_the_pod_except_to_this_nodes_pods(
    server: Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--in-pod-hbone: a tunnel to another node's pod from inside the source pod; to one of this node's pods (the
    same-node path turned off) from the node's namespace, where it is captured as that pod's inbound, not let
    through; without a source address, or where the pod is not found, from the node's too."""
    from_node: list[tuple[Address, str | None]] = []

    async def node_dial(addr: Address, *, source_ip: str | None = None, connect_timeout: float = 5.0) -> socket.socket:
        from_node.append((addr, source_ip))
        return socket.create_connection(addr)

    monkeypatch.setattr(inpod, "connect_upstream", node_dial)
    capture = FakeCapture()
    networks = FakeNetworks({"127.0.0.1"})
    conn = InPodConnector(networks, capture, is_local=lambda ip: ip == "127.0.0.5")  # type: ignore[arg-type]

    async def dial(addr: Address, source: str | None) -> None:
        (await conn.dial(addr, source_ip=source, connect_timeout=5)).close()

    asyncio.run(dial(server, "127.0.0.1"))
    assert capture.log == ["allow", "forget"] and from_node == [], "from inside the pod"
    local_server = socket.create_server(("127.0.0.5", 0))
    with local_server:
        local = local_server.getsockname()[:2]
        asyncio.run(dial(local, "127.0.0.1"))
    asyncio.run(dial(server, None))
    asyncio.run(dial(server, "127.0.0.3"))  # a pod whose namespace is not found
    assert from_node == [(local, "127.0.0.1"), (server, None), (server, "127.0.0.3")]
    assert capture.log == ["allow", "forget"], "nothing else was let through"
