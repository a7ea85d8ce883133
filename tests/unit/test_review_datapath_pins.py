"""The relay budget counts memory: what a stalled stream's backlog keeps alive, not the bytes it will write.

A relay keeps what its TCP socket did not take as views of the HBONE connection's 256 KiB receive buffers; each view
keeps its whole buffer alive. A peer trickling 8 KiB frames to streams whose readers stall got one frame per read,
so 20 MiB of backlog (counted against the 256 MiB budget) pinned 284 MiB: the budget bounded nothing."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest

from agent import tunnel
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import TunnelStats, relay
from tests.support.hbone_testbed import HboneServer
from tests.support.pki import TestCA

FRAME = 8 * 1024
STREAMS = 2


@pytest.fixture
async def server() -> AsyncIterator[tuple[HboneServer, TestCA]]:
    ca = TestCA()
    s = await HboneServer(ca.server_context(ca.issue(ca.identity("default", "server")))).start()
    yield s, ca
    await s.close()


def _pinned(relays: list[tunnel._TcpRelay]) -> tuple[int, int]:
    """(memory the relays' backlogs keep alive: each distinct object their views point into, once; bytes kept)."""
    objs: dict[int, int] = {}
    for r in relays:
        for v in r._backlog:
            objs[id(v.obj)] = len(cast(bytes, v.obj))
    return sum(objs.values()), sum(r._backlog_size for r in relays)


async def test_small_frames_to_stalled_streams_are_counted_by_what_they_pin(
    server: tuple[HboneServer, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    hbone, ca = server
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
    client_id = ca.identity("default", "client")
    ctx = ca.client_context(ca.issue(client_id))
    key = PoolKey(client_id, ca.identity("default", "server"), hbone.addr)
    pool = HboneConnectionPool(stats=TunnelStats())
    pairs = [socket.socketpair() for _ in range(STREAMS)]
    tasks: list[asyncio.Future[tunnel.RelayResult]] = []
    try:
        streams = []
        for i, (_, side) in enumerate(pairs):
            side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            stream = await pool.open_stream(key, ctx, f"stalled:{i}", [])
            streams.append(stream)
            tasks.append(asyncio.ensure_future(relay(side, stream)))
        proto = streams[0]._proto
        last = -1
        async with asyncio.timeout(60):
            while True:  # until the relays hold the streams' credit (backlog above WRITE_HIGH) and stop growing
                await asyncio.sleep(0.3)
                relays = [cast(tunnel._TcpRelay, s._sink) for s in streams]
                pinned, kept = _pinned(relays)
                if kept == last:
                    break
                last = kept
        assert kept > tunnel.WRITE_HIGH * STREAMS, "the stalled streams' bytes wait in their relays"
        assert proto.buffered == pinned == budget.total, f"counted {proto.buffered}, pinned {pinned}"
        # Pieces that are a small part of their buffer are copied: kept views pin at most _PIN_RATIO x their size
        # (and a partly written head view a buffer more per relay).
        assert pinned <= tunnel._PIN_RATIO * kept + STREAMS * tunnel.READ_SIZE, f"{pinned / kept:.1f}x"
    finally:
        stop.set()
        for app, _ in pairs:
            app.close()
        await asyncio.wait(tasks, timeout=10)
        await pool.close()
    assert budget.total == 0 and not budget._pins, "every pin was released with its relay"
