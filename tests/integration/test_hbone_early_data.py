"""Early data: the client's first bytes go out with the CONNECT instead of a round trip later (Ambit's client and
server on 127.0.0.1, both event loops). Bytes are hash-checked; a refused stream sends them again, exactly once
to the backend."""

from __future__ import annotations

import asyncio
import os
import socket

from agent.hbone import ErrorCode
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import ConnectRequest, TunnelConfig, relay
from bench.hbone_micro import forward_to_authority
from tests.support.hbone_testbed import Backend, HboneServer, digest, roundtrip
from tests.support.loops import BOTH_LOOPS, event_loop_policy  # noqa: F401  (fixture)
from tests.support.pki import TestCA
from tests.support.waiting import eventually

pytestmark = BOTH_LOOPS

CA = TestCA()
CLIENT_ID = CA.identity("default", "client")
SERVER_ID = CA.identity("default", "server")
CLIENT_CTX = CA.client_context(CA.issue(CLIENT_ID))
SERVER_CTX = CA.server_context(CA.issue(SERVER_ID))


def received_before_answer(req: ConnectRequest) -> bytes:
    """What the server holds for a stream it has not answered yet."""
    return b"".join(req._stream._rbuf)


async def test_early_bytes_reach_the_server_before_it_answers(pool: HboneConnectionPool, echo: Backend) -> None:
    held: list[bytes] = []

    async def handler(req: ConnectRequest) -> None:
        # Without early data nothing arrives before the 200, and this wait times out.
        await eventually(lambda: received_before_answer(req), "early bytes at the server", within=5)
        held.append(received_before_answer(req))
        await forward_to_authority(req)

    server = await HboneServer(SERVER_CTX, handler=handler).start()
    try:
        stream = await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, server.addr), CLIENT_CTX, echo.addr, [], b"first")
        assert held == [b"first"]
        assert await roundtrip(stream, b" and then more") == b"first and then more"
    finally:
        await server.close()


async def test_early_bytes_beyond_the_window_are_sent_by_the_relay(pool: HboneConnectionPool, echo: Backend) -> None:
    server = await HboneServer(SERVER_CTX, config=TunnelConfig(stream_window=65535)).start()
    early, later = os.urandom(200_000), os.urandom(300_000)
    app, inside = socket.socketpair()
    try:
        stream = await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, server.addr), CLIENT_CTX, echo.addr, [], early)
        assert stream._early_rest is not None, "a 64 KiB window cannot take 200 kB with the CONNECT"
        inside.setblocking(False)
        app.setblocking(False)
        relaying = asyncio.ensure_future(relay(inside, stream))
        loop = asyncio.get_running_loop()

        async def send() -> None:
            await loop.sock_sendall(app, later)
            app.shutdown(socket.SHUT_WR)

        sending = asyncio.ensure_future(send())
        got = bytearray()
        async with asyncio.timeout(30):
            while chunk := await loop.sock_recv(app, 1 << 16):
                got += chunk
            await sending
            result = await relaying
        assert digest(bytes(got)) == digest(early + later)
        assert (result.bytes_up, result.bytes_down, result.error) == (len(early) + len(later), len(got), None)
    finally:
        app.close()
        await server.close()


async def test_refused_stream_sends_the_early_bytes_again(pool: HboneConnectionPool, echo: Backend) -> None:
    seen: list[bytes] = []

    async def handler(req: ConnectRequest) -> None:
        await eventually(lambda: received_before_answer(req), "early bytes at the server", within=5)
        seen.append(received_before_answer(req))
        if len(seen) == 1:  # refused: provably not processed, so the client may send it all again
            req._proto.h2.reset_stream(req.stream_id, ErrorCode.REFUSED_STREAM)
            req._proto.flush()
            req._stream._on_reset("refused")
            return
        await forward_to_authority(req)

    server = await HboneServer(SERVER_CTX, handler=handler).start()
    try:
        stream = await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, server.addr), CLIENT_CTX, echo.addr, [], b"once")
        assert seen == [b"once", b"once"]
        assert await roundtrip(stream, b"!") == b"once!"
        assert echo.accepted == 1
    finally:
        await server.close()


async def test_leftover_early_bytes_go_first_through_write(pool: HboneConnectionPool, echo: Backend) -> None:
    server = await HboneServer(SERVER_CTX, config=TunnelConfig(stream_window=65535)).start()
    early, later = os.urandom(200_000), os.urandom(50_000)
    try:
        stream = await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, server.addr), CLIENT_CTX, echo.addr, [], early)
        assert stream._early_rest is not None
        got = await asyncio.wait_for(roundtrip(stream, later), 30)
        assert digest(got) == digest(early + later)
    finally:
        await server.close()


async def test_write_eof_sends_leftover_early_bytes_before_end_stream(pool: HboneConnectionPool, echo: Backend) -> None:
    """Half-closing at once, with no write after the CONNECT: END_STREAM must wait for the early bytes the window
    did not take, not cut them off."""
    server = await HboneServer(SERVER_CTX, config=TunnelConfig(stream_window=65535)).start()
    early = os.urandom(200_000)
    try:
        stream = await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, server.addr), CLIENT_CTX, echo.addr, [], early)
        assert stream._early_rest is not None
        stream.write_eof()
        got = b""
        while chunk := await asyncio.wait_for(stream.read(), 30):
            got += chunk
        assert digest(got) == digest(early)
    finally:
        await server.close()


async def test_early_bytes_never_sent_are_not_counted(pool: HboneConnectionPool, echo: Backend) -> None:
    """The server answers and at once resets: what did not fit its window with the CONNECT never left."""

    async def handler(req: ConnectRequest) -> None:
        await req.respond(200)
        req.stream.reset()

    server = await HboneServer(SERVER_CTX, handler=handler, config=TunnelConfig(stream_window=65535)).start()
    app, inside = socket.socketpair()
    try:
        stream = await pool.open_stream(
            PoolKey(CLIENT_ID, SERVER_ID, server.addr), CLIENT_CTX, echo.addr, [], os.urandom(200_000)
        )
        inside.setblocking(False)
        result = await asyncio.wait_for(relay(inside, stream), 10)
        assert result.error is not None
        assert result.bytes_up == 65535  # the stream window's worth went with the CONNECT; the rest stayed here
    finally:
        app.close()
        await server.close()
