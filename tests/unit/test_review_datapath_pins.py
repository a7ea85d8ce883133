"""The relay budget counts memory: what a stalled stream's backlog keeps alive, not the bytes it will write.

A relay keeps what its TCP socket did not take as views of the HBONE connection's 256 KiB receive buffers; each view
keeps its whole buffer alive. A peer trickling 8 KiB frames to streams whose readers stall got one frame per read,
so 20 MiB of backlog (counted against the 256 MiB budget) pinned 284 MiB: the budget bounded nothing."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
from typing import cast

import pytest

from agent import tunnel
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import TunnelStats, relay
from tests.support.hbone_testbed import HboneServer
from tests.support.pki import TestCA

FRAME = 8 * 1024
STREAMS = 2


def _pinned(relays: list[tunnel._TcpRelay]) -> tuple[int, int]:
    """(memory the relays' backlogs keep alive: their copies, and each distinct buffer their views point into, once;
    bytes kept)."""
    objs: dict[int, int] = {}
    for r in relays:
        for v in r._backlog:
            buf = v if isinstance(v, bytearray) else cast(bytes, v.obj)
            objs[id(buf)] = len(buf)
    return sum(objs.values()), sum(r._backlog_size for r in relays)


@functools.cache
def _client_context(ca: TestCA) -> ssl.SSLContext:
    """One client certificate per CA: the pool puts streams of one context on one connection (a new context, as
    after a renewal, gets a new connection)."""
    return ca.client_context(ca.issue(ca.identity("default", "client")))


async def _stalled_stream(
    hbone_server: tuple[HboneServer, TestCA], pool: HboneConnectionPool, name: str
) -> tuple[tunnel.HboneStream, socket.socket, asyncio.Future[tunnel.RelayResult]]:
    hbone, ca = hbone_server
    client_id = ca.identity("default", "client")
    key = PoolKey(client_id, ca.identity("default", "server"), hbone.addr)
    app, side = socket.socketpair()
    side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills at once: the relay keeps a backlog
    stream = await pool.open_stream(key, _client_context(ca), name, [])
    return stream, app, asyncio.ensure_future(relay(side, stream))


async def test_small_frames_to_stalled_streams_are_counted_by_what_they_pin(
    hbone_server: tuple[HboneServer, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    hbone, _ = hbone_server
    budget = tunnel._BufferBudget(1 << 40)  # never over: this test is about the count
    monkeypatch.setattr(tunnel, "BUFFERS", budget)
    stop = asyncio.Event()

    async def handler(req: tunnel.ConnectRequest) -> None:
        await req.respond(200)
        chunk = os.urandom(FRAME)
        try:
            while not stop.is_set():
                await req.stream.write(chunk)  # one small frame at a time: most reads of the client carry one
                await asyncio.sleep(0.0005)
        except tunnel.HboneStreamReset:
            pass

    hbone.handler = handler
    pool = HboneConnectionPool(stats=TunnelStats())
    apps: list[socket.socket] = []
    tasks: list[asyncio.Future[tunnel.RelayResult]] = []
    try:
        streams = []
        for i in range(STREAMS):
            stream, app, task = await _stalled_stream(hbone_server, pool, f"stalled:{i}")
            streams.append(stream)
            apps.append(app)
            tasks.append(task)
        proto = streams[0]._proto
        last = -1
        async with asyncio.timeout(60):
            while True:  # until the relays hold the streams' credit (backlog above WRITE_HIGH) and stop growing
                await asyncio.sleep(0.3)
                relays = [cast(tunnel._TcpRelay, s._sink) for s in streams]
                pinned, kept = _pinned(relays)
                if kept == last and kept > tunnel.WRITE_HIGH * STREAMS:
                    break
                last = kept
        assert kept > tunnel.WRITE_HIGH * STREAMS, "the stalled streams' bytes wait in their relays"
        assert proto.buffered == pinned == budget.total, f"counted {proto.buffered}, pinned {pinned}"
        # Pieces that are a small part of their buffer are copied: kept views pin at most _PIN_RATIO x their size
        # (and a partly written head view a buffer more per relay).
        assert pinned <= tunnel._PIN_RATIO * kept + STREAMS * tunnel.READ_SIZE, f"{pinned / kept:.1f}x"
    finally:
        stop.set()
        for app in apps:
            app.close()
        await asyncio.wait(tasks, timeout=10)
        await pool.close()
    assert budget.total == 0 and not budget._pins, "every pin was released with its relay"


TINY = 30_000


async def test_one_byte_frames_to_a_stalled_stream_are_kept_in_few_objects(
    hbone_server: tuple[HboneServer, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each piece a relay copied was an object of its own (a memoryview over a bytes: ~450 bytes of RSS): 1-byte
    frames made the backlog's objects weigh hundreds of times the bytes counted (196 KB counted, +89 MiB RSS), and a
    stream window of them (4 MiB) about 2 GB. Copies now go into the backlog's last copy."""
    hbone, _ = hbone_server
    budget = tunnel._BufferBudget(1 << 40)
    monkeypatch.setattr(tunnel, "BUFFERS", budget)

    async def handler(req: tunnel.ConnectRequest) -> None:
        await req.respond(200)
        for _ in range(TINY):
            await req.stream.write(b"x")  # one DATA frame each
        await req.stream.read()

    hbone.handler = handler
    pool = HboneConnectionPool(stats=TunnelStats())
    stream, app, task = await _stalled_stream(hbone_server, pool, "tiny:1")
    try:
        async with asyncio.timeout(60):
            while True:  # until every frame reached the relay
                await asyncio.sleep(0.05)
                if stream._sink is not None and cast(tunnel._TcpRelay, stream._sink).down == TINY:
                    break
        r = cast(tunnel._TcpRelay, stream._sink)
        pinned, kept = _pinned([r])
        assert kept > TINY // 2, "most of the frames wait in the relay"
        assert len(r._backlog) <= kept // tunnel._COPY_MAX + 2, f"{len(r._backlog)} objects for {kept} bytes"
        assert pinned == kept == budget.total
    finally:
        app.close()
        await asyncio.wait([task], timeout=10)
        await pool.close()
    assert budget.total == 0


SMALL_FRAMES = 20_000


async def test_small_frames_on_an_unanswered_stream_are_kept_in_few_objects(
    hbone_server: tuple[HboneServer, TestCA],
) -> None:
    """Until the server answers a CONNECT (its upstream connect still running), what the client sends waits in the
    stream, within the connection window. Each frame was a bytes object of its own: 2-byte frames cost ~57 bytes of
    RSS per 2 bytes (600 KB kept, +17 MiB), so one connection window of them about 450 MB."""
    hbone, ca = hbone_server
    answer = asyncio.Event()
    requests: list[tunnel.ConnectRequest] = []

    async def handler(req: tunnel.ConnectRequest) -> None:
        requests.append(req)
        await answer.wait()
        await req.respond(503)

    hbone.handler = handler
    client_id = ca.identity("default", "client")
    conn = await tunnel.connect(
        hbone.addr, ca.client_context(ca.issue(client_id)), ca.identity("default", "server"), stats=TunnelStats()
    )
    proto = conn._proto
    try:
        sid = proto.h2.send_connect("unanswered:1", [])
        for _ in range(SMALL_FRAMES):
            assert proto.h2.send_data(sid, b"ab") == 2  # one DATA frame each
        proto.flush()
        async with asyncio.timeout(30):
            while True:  # until every byte waits in the server's stream
                await asyncio.sleep(0.05)
                if requests and sum(map(len, requests[0]._stream._rbuf)) == 2 * SMALL_FRAMES:
                    break
        rbuf = requests[0]._stream._rbuf
        assert len(rbuf) <= 2 * SMALL_FRAMES // tunnel._COPY_MAX + 1, f"{len(rbuf)} objects"
        assert b"".join(rbuf) == b"ab" * SMALL_FRAMES
    finally:
        answer.set()
        conn.close()
        await conn.wait_closed()
