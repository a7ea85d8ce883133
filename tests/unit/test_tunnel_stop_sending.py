"""A stream peer that ends its side and then resets with NO_ERROR (RFC 9113 8.1: "stop sending, the response is
complete") while the TCP client is still sending: the relay must deliver the whole response, then a FIN.

The client's further bytes have nowhere to go, but they must be read and dropped, not left in the socket: closing
a TCP socket with unread bytes sends RST, and the reset throws away whatever of the response the kernel still held
for a slow client (an HTTP server answering 413 to an upload it stopped reading, as Envoy does)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest

from agent.hbone import ErrorCode
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import ConnectRequest, RelayResult, relay
from tests.support.hbone_testbed import HboneServer
from tests.support.loops import BOTH_LOOPS, event_loop_policy  # noqa: F401  (fixture)
from tests.support.pki import TestCA
from tests.support.waiting import eventually

pytestmark = BOTH_LOOPS

RESPONSE = 3 * 1024 * 1024  # within the stream window: sent at once, most of it queued for the slow client


class Peer:
    """An HBONE server whose handler answers a fixed response, ends its side and resets with NO_ERROR."""

    def __init__(self) -> None:
        self.ca = TestCA()
        self.client_id = self.ca.identity("default", "client")
        self.server_id = self.ca.identity("default", "server")
        self.response = os.urandom(RESPONSE)
        self.stopped = asyncio.Event()
        self.server = HboneServer(self.ca.server_context(self.ca.issue(self.server_id)), handler=self._handle)

    async def _handle(self, req: ConnectRequest) -> None:
        await req.respond(200)
        stream = req.stream
        await stream.read()  # the start of the request; the rest is never read
        await stream.write(self.response)
        stream.write_eof()
        req._proto.h2.reset_stream(req.stream_id, ErrorCode.NO_ERROR)
        req._proto.flush()
        self.stopped.set()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    await p.server.start()
    yield p
    await p.server.close()


async def _relayed_client(
    peer: Peer, pool: HboneConnectionPool
) -> tuple[socket.socket, socket.socket, asyncio.Future[RelayResult]]:
    """A slow TCP client (small receive buffer) and the relay's end of its connection, relayed into a stream to
    ``peer``."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    app = socket.socket()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    app.setblocking(False)
    try:
        await loop.sock_connect(app, lsock.getsockname())
        side, _ = await loop.sock_accept(lsock)
    finally:
        lsock.close()
    key = PoolKey(peer.client_id, peer.server_id, peer.server.addr)
    stream = await pool.open_stream(key, peer.ca.client_context(peer.ca.issue(peer.client_id)), "x:1", [])
    return app, side, asyncio.ensure_future(relay(side, stream))


async def test_client_bytes_after_stop_sending_do_not_reset_the_response(peer: Peer, pool: HboneConnectionPool) -> None:
    loop = asyncio.get_running_loop()
    app, side, relaying = await _relayed_client(peer, pool)
    try:
        await loop.sock_sendall(app, b"request head")
        await asyncio.wait_for(peer.stopped.wait(), 10)
        await asyncio.sleep(0.1)  # the NO_ERROR reset has reached the relay
        await loop.sock_sendall(app, b"request body nobody reads any more" * 100)
        await asyncio.sleep(0.1)  # ... and it is in the relay's socket before the client reads the answer
        got = bytearray()
        async with asyncio.timeout(20):
            while chunk := await loop.sock_recv(app, 1 << 16):  # a reset raises ConnectionResetError here
                got += chunk
        assert len(got) == RESPONSE
        assert hashlib.sha256(got).digest() == hashlib.sha256(peer.response).digest()
        result = await asyncio.wait_for(relaying, 10)  # done without waiting for the client to close its side
        assert result.bytes_down == RESPONSE and result.error is None
        await loop.sock_sendall(app, b"still sending")  # dropped, not answered with RST
        app.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(loop.sock_recv(app, 1), 10) == b""
        await eventually(lambda: side.fileno() == -1, "the relay's socket closed after the client's FIN", within=10)
    finally:
        app.close()
        if not relaying.done():
            relaying.cancel()


async def test_a_client_that_stops_sending_first_still_gets_the_response(peer: Peer, pool: HboneConnectionPool) -> None:
    """The ordinary order (the client's FIN before the reset) keeps working: nothing is left to drop."""
    loop = asyncio.get_running_loop()
    app, side, relaying = await _relayed_client(peer, pool)
    try:
        await loop.sock_sendall(app, b"request")
        app.shutdown(socket.SHUT_WR)
        got = bytearray()
        async with asyncio.timeout(20):
            while chunk := await loop.sock_recv(app, 1 << 16):
                got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(peer.response).digest()
        result = await asyncio.wait_for(relaying, 10)
        assert result == RelayResult(len(b"request"), RESPONSE, None)
        assert side.fileno() == -1  # nothing to linger for: closed with the relay
    finally:
        app.close()
        if not relaying.done():
            relaying.cancel()
