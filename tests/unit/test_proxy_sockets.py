"""agent.sockets.connect_upstream on both event loops: connected sockets, refusals as ConnectionRefusedError."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from agent.sockets import (
    Listener,
    canonical_ip,
    connect_upstream,
    make_nonblocking,
    original_destination,
    peer_or_close,
    read_waiting,
    transparent_listener,
)
from common.addresses import any_address

LOOPS = ["asyncio", "uvloop"]


def run(loop_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_name == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connects_and_carries_bytes(loop_name: str) -> None:
    server = socket.create_server(("127.0.0.1", 0))

    async def main() -> None:
        up = await connect_upstream(server.getsockname())
        with up:
            peer, _ = server.accept()
            with peer:
                assert up.getpeername() == server.getsockname()
                assert up.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                up.setblocking(True)
                up.sendall(b"ping")
                assert peer.recv(4) == b"ping"

    with server:
        run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_refused(loop_name: str) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    addr = probe.getsockname()
    probe.close()  # nothing listens there now

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError):
            await connect_upstream(addr)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_many_sequential_connects_leave_no_watchers(loop_name: str) -> None:
    """Each connect registers and removes a writer on its socket; a leftover would break the next transport."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            up = await connect_upstream(server.getsockname())
            peer, _ = server.accept()
            reader, writer = await asyncio.open_connection(sock=up)
            peer.sendall(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            await writer.wait_closed()
            peer.close()
        assert loop.is_running()

    with server:
        run(loop_name, main)


def test_listener_accepts_with_nodelay() -> None:
    """Accepted client sockets must not delay small writes (Nagle) waiting for the client's delayed ACK."""
    seen: list[int] = []

    async def main() -> None:
        done = asyncio.Event()

        async def handler(conn: socket.socket, orig_dst: tuple[str, int]) -> None:
            seen.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            conn.close()
            done.set()

        listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), handler, "test")
        listener.start()
        try:
            client = socket.create_connection(listener.address)
            await asyncio.wait_for(done.wait(), 5)
            client.close()
        finally:
            await listener.close()

    uvloop.run(main())
    assert seen and seen[0] != 0


def test_read_waiting_takes_what_arrived_and_never_waits() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert read_waiting(a, 16) == b""  # nothing yet: no wait
        b.sendall(b"first bytes")
        assert read_waiting(a, 0) == b""  # early data off: nothing taken
        assert read_waiting(a, 5) == b"first"
        assert read_waiting(a, 16) == b" bytes"


def test_dual_stack_listener_reports_ipv4_clients_as_ipv4() -> None:
    """`--listen-address ::` sees IPv4 connections as ::ffff:a.b.c.d; the handlers must get plain IPv4."""
    lst = transparent_listener(0, "::", transparent=False)
    with lst:
        port = lst.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        with client:
            lst.setblocking(True)
            conn, raw = lst.accept()
            with conn:
                assert raw[0] == "::ffff:127.0.0.1"  # what the kernel reports, so the test can fail
                assert original_destination(conn) == ("127.0.0.1", port)
                assert peer_or_close(conn) == ("127.0.0.1", client.getsockname()[1])
    assert canonical_ip("::1") == "::1" and canonical_ip("fd00::ffff:1") == "fd00::ffff:1"


def test_make_nonblocking_skips_sockets_already_nonblocking() -> None:
    """A socket Python knows is non-blocking is left alone (no ioctl); a blocking one is switched."""
    calls: list[bool] = []

    class Spy(socket.socket):
        def setblocking(self, flag: bool) -> None:
            calls.append(flag)
            super().setblocking(flag)

    with Spy(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as made_so:
        make_nonblocking(made_so)
        assert calls == [] and not made_so.getblocking()
    with Spy(socket.AF_INET, socket.SOCK_STREAM) as blocking:
        make_nonblocking(blocking)
        assert calls == [False] and not blocking.getblocking()


def test_the_default_listen_address_serves_ipv4_and_falls_back_without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's default: `::` where the kernel has IPv6 (IPv6 pods are not dropped for want of a listener), which
    must still take IPv4; `0.0.0.0` where it has none (a kernel booted with ipv6.disable=1)."""
    address = any_address()
    listener = transparent_listener(0, address, transparent=False)
    try:
        with socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5):
            pass
    finally:
        listener.close()
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    assert any_address() == "0.0.0.0"
