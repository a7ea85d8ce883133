"""Receive buffers of HBONE relays: what a connection holds between reads once it has moved bulk data.

Before, a relay that had once filled its small buffer kept a 256 KiB one (and often a spare) for as long as it lived,
so a node with many long-lived connections (database pools, gRPC channels) paid a quarter to half a megabyte per
idle connection on each agent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from agent import tunnel
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import TunnelStats, relay
from tests.support.hbone_testbed import Backend, HboneServer, echo  # noqa: F401  (fixture)
from tests.support.pki import TestCA

CONNECTIONS = 40
PAYLOAD = 96 * 1024  # well above the small buffer, so every relay on both sides has read into big buffers


@pytest.fixture
async def server() -> AsyncIterator[tuple[HboneServer, TestCA]]:
    ca = TestCA()
    s = await HboneServer(ca.server_context(ca.issue(ca.identity("default", "server")))).start()
    yield s, ca
    await s.close()


async def _echo_through(app: socket.socket, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(app, payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = await loop.sock_recv(app, 1 << 16)
        assert chunk, "the tunnel closed early"
        got += chunk
    return bytes(got)


def _held_by_tunnel(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated in agent/tunnel.py that are still alive (the receive buffers are the big ones)."""
    only = snapshot.filter_traces([tracemalloc.Filter(True, tunnel.__file__)])
    return sum(stat.size for stat in only.statistics("filename"))


async def test_idle_relays_hold_no_big_receive_buffer(
    server: tuple[HboneServer, TestCA],
    echo: Backend,  # noqa: F811
) -> None:
    hbone, ca = server
    client_id = ca.identity("default", "client")
    ctx = ca.client_context(ca.issue(client_id))
    key = PoolKey(client_id, ca.identity("default", "server"), hbone.addr)
    pool = HboneConnectionPool(stats=TunnelStats())
    apps: list[socket.socket] = []
    relays: list[asyncio.Future[tunnel.RelayResult]] = []
    payload = os.urandom(PAYLOAD)
    tracemalloc.start()
    try:
        for _ in range(CONNECTIONS):
            app, side = socket.socketpair()
            app.setblocking(False)
            apps.append(app)
            stream = await pool.open_stream(key, ctx, echo.addr, [])
            relays.append(asyncio.ensure_future(relay(side, stream)))
        echoed = await asyncio.gather(*(_echo_through(app, payload) for app in apps))
        assert {hashlib.sha256(e).digest() for e in echoed} == {hashlib.sha256(payload).digest()}
        await asyncio.sleep(0.05)  # every relay idle, both sides
        held = _held_by_tunnel(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
        for app in apps:
            app.close()
        await asyncio.wait(relays, timeout=10)
        await pool.close()
    # 2 x 40 idle relays: their small buffers and the few shared big ones, not one 256 KiB buffer each (~20 MiB)
    assert held < 4 * 1024 * 1024, f"{held / 2**20:.1f} MiB held by {2 * CONNECTIONS} idle relays"
    assert len(tunnel._BIG) <= 8
