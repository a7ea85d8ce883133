"""Lifetime of HBONE server connections: cancelling one (what the agent's drain does to connections still open
when it ends) must leave nothing registered with the event loop on a descriptor the caller is about to close.

Both loops run these: the stdlib loop keeps a stale selector registration for a closed fd, which the next socket to
get that fd number inherits (its add_reader fails, or the old transport later removes the new socket's watch);
uvloop defers the close to its transport instead."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from agent.sockets import Listener, transparent_listener
from agent.tunnel import (
    ConnectRequest,
    HboneConnectError,
    ServerConnections,
    TunnelStats,
    connect,
    serve_hbone_connection,
)
from tests.support.loops import BOTH_LOOPS, event_loop_policy  # noqa: F401  (fixture)
from tests.support.pki import TestCA
from tests.support.waiting import eventually

pytestmark = BOTH_LOOPS


class HboneListener:
    """The agent's inbound HBONE listener shape: a Listener whose handler serves the accepted socket."""

    def __init__(self) -> None:
        self.ca = TestCA()
        self.server_id = self.ca.identity("default", "server")
        self.client_id = self.ca.identity("default", "client")
        self.server_ctx = self.ca.server_context(self.ca.issue(self.server_id))
        self.fds: list[int] = []
        self.stats = TunnelStats()
        self.listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), self._serve, "hbone")

    async def _serve(self, sock: socket.socket, _dst: tuple[str, int]) -> None:
        self.fds.append(sock.fileno())

        async def answer(req: ConnectRequest) -> None:
            await req.respond(200)

        await serve_hbone_connection(sock, self.server_ctx, answer, trust_domain="cluster.local", stats=self.stats)


@pytest.fixture
async def hbone() -> AsyncIterator[HboneListener]:
    h = HboneListener()
    h.listener.start()
    yield h
    await h.listener.close()


async def test_cancelled_server_connection_leaves_its_fd_to_the_next_socket(hbone: HboneListener) -> None:
    loop = asyncio.get_running_loop()
    client = await connect(
        hbone.listener.address, hbone.ca.client_context(hbone.ca.issue(hbone.client_id)), hbone.server_id
    )
    await eventually(lambda: hbone.stats.connections_opened == 1, "the server side is up")
    (fd,) = hbone.fds
    await hbone.listener.close()  # drain's end: cancels serve_hbone_connection, the listener closes the socket
    # The next sockets take the lowest free descriptors: one of them gets the served connection's number.
    spare: list[socket.socket] = []
    try:
        while not any(s.fileno() == fd for s in spare):
            assert len(spare) < 64, f"fd {fd} was not reused: the served socket is still open"
            spare.extend(socket.socketpair())
        reused = next(s for s in spare if s.fileno() == fd)
        other = spare[spare.index(reused) ^ 1]
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            other.send(b"x")
            await asyncio.wait_for(readable.wait(), 5)
            await asyncio.sleep(0.05)  # the old connection's late callbacks, if any, run now
            readable.clear()
            other.send(b"y")  # the watch must still be the new socket's
            await asyncio.wait_for(readable.wait(), 5)
        finally:
            loop.remove_reader(fd)
    finally:
        for s in spare:
            s.close()
        client.abort()
        await client.wait_closed()


async def test_drain_sends_goaway_and_lets_open_streams_finish() -> None:
    """What the agent does when it starts draining: clients stop opening streams on the connection (their pool
    dials again) while a stream already open keeps moving bytes both ways; the connection then closes with it."""
    ca = TestCA()
    server_id, client_id = ca.identity("default", "server"), ca.identity("default", "client")
    server_ctx = ca.server_context(ca.issue(server_id))
    served = ServerConnections()

    async def echo(req: ConnectRequest) -> None:
        await req.respond(200)
        while data := await req.stream.read():
            await req.stream.write(data)
        req.stream.write_eof()

    async def serve(sock: socket.socket, _dst: tuple[str, int]) -> None:
        await serve_hbone_connection(sock, server_ctx, echo, trust_domain="cluster.local", connections=served)

    listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), serve, "hbone")
    listener.start()
    client = await connect(listener.address, ca.client_context(ca.issue(client_id)), server_id)
    try:
        stream = await client.open_stream("10.0.0.1:80", [])
        await eventually(lambda: len(served) == 1, "the connection is being served")
        assert served.drain() == 1
        await eventually(lambda: not client.usable, "the client saw GOAWAY")
        await stream.write(b"still here")
        assert await stream.read() == b"still here"  # the open stream carries on
        with pytest.raises(HboneConnectError):
            await client.open_stream("10.0.0.1:80", [])  # a new one is not opened on a drained connection
        stream.write_eof()
        assert await stream.read() == b""
        await asyncio.wait_for(client.wait_closed(), 5)  # closed with its last stream
        await eventually(lambda: len(served) == 0, "the server forgot the connection")
    finally:
        client.abort()
        await listener.close()


async def test_drain_closes_an_idle_connection_at_once() -> None:
    ca = TestCA()
    server_id = ca.identity("default", "server")
    served = ServerConnections()

    async def serve(sock: socket.socket, _dst: tuple[str, int]) -> None:
        ctx = ca.server_context(ca.issue(server_id))
        await serve_hbone_connection(sock, ctx, _never, trust_domain="cluster.local", connections=served)

    listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), serve, "hbone")
    listener.start()
    client = await connect(listener.address, ca.client_context(ca.issue(ca.identity("default", "c"))), server_id)
    try:
        await eventually(lambda: len(served) == 1, "the connection is being served")
        served.drain()
        await asyncio.wait_for(client.wait_closed(), 5)
    finally:
        client.abort()
        await listener.close()


async def _never(req: ConnectRequest) -> None:
    raise AssertionError("no stream was opened")
