"""The relay budget when a held HBONE connection dies: what its relays kept leaves the count with them, so the agent
is not left over its budget (holding every other connection that keeps bytes) by connections that are gone."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from agent import tunnel
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import TunnelStats, relay
from tests.support.hbone_testbed import HboneServer
from tests.support.pki import TestCA

MiB = 1024 * 1024
STALLED = 6


async def test_a_held_connection_that_dies_leaves_nothing_counted(
    hbone_server: tuple[HboneServer, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    hbone, ca = hbone_server
    budget = tunnel._BufferBudget(2 * MiB)
    monkeypatch.setattr(tunnel, "BUFFERS", budget)
    server_sides: list[tunnel._HboneProtocol] = []
    payload = os.urandom(3 * MiB)

    async def handler(req: tunnel.ConnectRequest) -> None:
        server_sides.append(req._proto)
        await req.respond(200)
        await req.stream.write(payload)
        await req.stream.read()

    hbone.handler = handler
    client_id = ca.identity("default", "client")
    ctx = ca.client_context(ca.issue(client_id))
    key = PoolKey(client_id, ca.identity("default", "server"), hbone.addr)
    pool = HboneConnectionPool(
        config=tunnel.TunnelConfig(stream_window=MiB, connection_window=2 * MiB), stats=TunnelStats()
    )
    apps: list[socket.socket] = []
    tasks: list[asyncio.Future[tunnel.RelayResult]] = []
    try:
        for i in range(STALLED):
            app, side = socket.socketpair()
            side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            apps.append(app)
            stream = await pool.open_stream(key, ctx, f"stalled:{i}", [])
            tasks.append(asyncio.ensure_future(relay(side, stream)))
        proto = stream._proto
        async with asyncio.timeout(30):
            while True:  # until the budget holds the connection's credit
                await asyncio.sleep(0.05)
                if budget.over and proto.h2.connection_credit_held:
                    break
        assert budget.total > budget.budget
        for p in set(server_sides):
            assert p.transport is not None
            p.transport.abort()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*tasks)
        assert all(r.error for r in results), "every relay of the dead connection ended with an error"
        assert budget.total == 0 and proto.buffered == 0
        assert not budget.over and not budget._keeping and not budget._pins
    finally:
        for app in apps:
            app.close()
        await asyncio.wait(tasks, timeout=10)
        await pool.close()
