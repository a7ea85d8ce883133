"""Relays whose client vanished without a FIN or RST reaching the agent: a pod un-enrolled mid-connection (its
packets no longer go to the agent's socket), a node that went away. On 127.0.0.1, with the agent's Listener and
SpliceRelay; TCP_REPAIR (root) makes the client's kernel forget its end without a word to the peer."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent import sockets
from agent.relay import SpliceRelay
from agent.sockets import Address, Listener, connect_upstream, transparent_listener
from tests.support.loops import BOTH_LOOPS, event_loop_policy
from tests.support.proxy_echo import echo_server

pytestmark = BOTH_LOOPS
__all__ = ["event_loop_policy"]

TCP_REPAIR = 19  # linux/tcp.h


async def test_a_relay_whose_client_vanished_silently_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without keepalive the agent's socket stayed ESTABLISHED and its relay waited for the client forever: found
    in the mesh lab after un-enrolling and re-enrolling a namespace under traffic (15 relays, their sockets and the
    sockets_open gauge never came back). With it, the first probe meets the client's kernel, which answers RST."""
    monkeypatch.setattr(sockets, "KEEPALIVE", (1, 1, 2))  # ztunnel's 180 s would outlast the test
    echo = await echo_server("127.0.0.1")
    echo_port = echo.sockets[0].getsockname()[1]
    ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def handler(conn: socket.socket, _dst: Address) -> None:
        upstream = await connect_upstream(("127.0.0.1", echo_port))
        ended.set_result((await SpliceRelay(conn, upstream).run()).error)

    listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), handler, "test")
    listener.start()
    client = socket.socket()
    try:
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, listener.address)
        await loop.sock_sendall(client, b"ping")
        assert await loop.sock_recv(client, 4) == b"ping"  # the relay is running
        client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        client.close()  # in repair mode: no FIN, no RST
        async with asyncio.timeout(20):  # liveness bound; without keepalive this never ends
            error = await ended
        assert error is not None, "the vanished client's connection must end as a failure"
    finally:
        client.close()
        await listener.close()
        echo.close()
        await echo.wait_closed()
