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
from typing import cast

import pytest

from agent import tunnel
from agent.metrics import Metrics
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import TunnelStats, relay
from tests.support.hbone_testbed import Backend, HboneServer
from tests.support.pki import TestCA

CONNECTIONS = 40
PAYLOAD = 96 * 1024  # well above the small buffer, so every relay on both sides has read into big buffers


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
    hbone_server: tuple[HboneServer, TestCA],
    echo: Backend,
) -> None:
    hbone, ca = hbone_server
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


async def test_a_slow_readers_small_frames_do_not_pin_the_connections_receive_buffers(
    hbone_server: tuple[HboneServer, TestCA],
) -> None:
    """One stream trickles small frames to a TCP client that never reads while another stream of the same pooled
    connection moves bulk data: each TLS read then carries one small frame of the slow stream, and the relay keeps
    what its socket did not take. Kept as a view, each such frame held a whole 256 KiB receive buffer."""
    hbone, ca = hbone_server
    bulk_done = asyncio.Event()

    async def handler(req: tunnel.ConnectRequest) -> None:
        await req.respond(200)
        stream = req.stream
        if req.authority == "slow:1":
            while not bulk_done.is_set():
                await stream.write(os.urandom(200))
                await asyncio.sleep(0)
        else:
            chunk = os.urandom(64 * 1024)
            for _ in range(32 * 16):  # 32 MiB
                await stream.write(chunk)
            stream.write_eof()
            bulk_done.set()
        await stream.read()  # until the client side goes away

    hbone.handler = handler
    client_id = ca.identity("default", "client")
    ctx = ca.client_context(ca.issue(client_id))
    key = PoolKey(client_id, ca.identity("default", "server"), hbone.addr)
    pool = HboneConnectionPool(stats=TunnelStats())
    slow_app, slow_side = socket.socketpair()
    slow_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills at once: the relay keeps a backlog
    fast_app, fast_side = socket.socketpair()
    fast_app.setblocking(False)
    loop = asyncio.get_running_loop()
    relays: list[asyncio.Future[tunnel.RelayResult]] = []
    tracemalloc.start()
    try:
        slow = await pool.open_stream(key, ctx, "slow:1", [])
        relays.append(asyncio.ensure_future(relay(slow_side, slow)))
        fast = await pool.open_stream(key, ctx, "fast:1", [])
        relays.append(asyncio.ensure_future(relay(fast_side, fast)))
        moved = 0
        async with asyncio.timeout(60):
            while chunk := await loop.sock_recv(fast_app, 1 << 16):
                moved += len(chunk)
        assert moved == 32 * 1024 * 1024
        await asyncio.sleep(0.05)
        backlog = cast(tunnel._TcpRelay, slow._sink)._backlog_size
        held = _held_by_tunnel(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
        for s in (slow_app, fast_app):
            s.close()
        await asyncio.wait(relays, timeout=10)
        await pool.close()
    assert backlog > 20 * 1024, "the slow stream's bytes wait in the relay"
    # The backlog itself plus the few shared big buffers, not one 256 KiB buffer per frame waiting (~40 MiB)
    assert held < 8 * 1024 * 1024, f"{held / 2**20:.1f} MiB held for a {backlog / 1024:.0f} KiB backlog"


STALLED = 12


async def test_stalled_streams_keep_at_most_the_budget_and_a_connection_window(
    hbone_server: tuple[HboneServer, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stream of one pooled connection sends to a TCP client that does not read. Each relay may keep a stream
    window (and WRITE_HIGH) of what its socket did not take, so what the agent kept grew with the number of streams
    (12 x 2 MiB here; 200 x 5 MiB with the defaults). Over the agent's budget (lowered here to 2 MiB), connections
    whose relays keep something hold their connection credit: this one keeps at most the budget and about one more
    connection window, and once the clients read, every byte still arrives, in order."""
    hbone, ca = hbone_server
    payload = os.urandom(3 * 1024 * 1024)

    async def handler(req: tunnel.ConnectRequest) -> None:
        await req.respond(200)
        await req.stream.write(payload)
        req.stream.write_eof()
        await req.stream.read()

    hbone.handler = handler
    client_id = ca.identity("default", "client")
    ctx = ca.client_context(ca.issue(client_id))
    key = PoolKey(client_id, ca.identity("default", "server"), hbone.addr)
    window = 1024 * 1024
    config = tunnel.TunnelConfig(stream_window=window, connection_window=2 * window)
    budget = tunnel._BufferBudget(2 * window)
    monkeypatch.setattr(tunnel, "BUFFERS", budget)
    pool = HboneConnectionPool(config=config, stats=TunnelStats())
    loop = asyncio.get_running_loop()
    pairs = [socket.socketpair() for _ in range(STALLED)]
    relays: list[asyncio.Future[tunnel.RelayResult]] = []
    pools = [pool]
    try:
        streams = []
        for i, (app, side) in enumerate(pairs):
            app.setblocking(False)
            side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            stream = await pool.open_stream(key, ctx, f"stalled:{i}", [])
            streams.append(stream)
            relays.append(asyncio.ensure_future(relay(side, stream)))
        proto = streams[0]._proto
        assert all(s._proto is proto for s in streams), "one pooled connection"
        most = last = 0
        async with asyncio.timeout(30):
            while True:  # until what the relays keep stops growing
                await asyncio.sleep(0.3)
                kept = sum(cast(tunnel._TcpRelay, s._sink)._backlog_size for s in streams)
                most = max(most, proto.buffered)
                if kept == last:
                    break
                last = kept
        assert proto.buffered == budget.total >= kept, "counted as what the backlogs keep alive (>= their bytes)"
        assert kept > 2 * window, "the relays keep what their sockets do not take"
        exported = Metrics(TunnelStats()).registry
        assert exported.get_sample_value("ambit_relay_buffered_bytes") == proto.buffered
        assert exported.get_sample_value("ambit_relay_buffer_budget_exceeded_total") == 1

        async def read_all(app: socket.socket) -> bytes:
            got = bytearray()
            while chunk := await loop.sock_recv(app, 1 << 16):
                got += chunk
            return bytes(got)

        # Another connection, whose relay keeps nothing, is not held while this one is.
        assert budget.over and proto.h2.connection_credit_held
        other_pool = HboneConnectionPool(config=config, stats=TunnelStats())
        pools = [pool, other_pool]
        fast_app, fast_side = socket.socketpair()
        fast_app.setblocking(False)
        pairs.append((fast_app, fast_side))
        fast = await other_pool.open_stream(key, ctx, "fast:1", [])
        assert fast._proto is not proto
        relays.append(asyncio.ensure_future(relay(fast_side, fast)))
        async with asyncio.timeout(60):
            assert await read_all(fast_app) == payload
            assert proto.h2.connection_credit_held, "the stalled connection still holds its credit"
            received = await asyncio.gather(*(read_all(app) for app, _ in pairs[:STALLED]))
    finally:
        for app, _ in pairs:
            app.close()
        await asyncio.wait(relays, timeout=10)
        for p in pools:
            await p.close()
    # The budget, what the peer may still send then (one connection window), and a few reads parsed (credited)
    # before their bytes reach the relays; without the budget: 12 x 2 MiB.
    assert most <= budget.budget + config.connection_window + 4 * tunnel.READ_SIZE, f"{most / 2**20:.1f} MiB kept"
    assert [hashlib.sha256(r).digest() for r in received] == [hashlib.sha256(payload).digest()] * STALLED
    assert proto.buffered == 0 == budget.total and not proto.h2.connection_credit_held


class _FakeConnection:
    """Stands for an _HboneProtocol: what the budget reads and calls."""

    def __init__(self) -> None:
        self.buffered = 0
        self.held = False

    def hold_credit(self, hold: bool) -> None:
        self.held = hold


def test_budget_holds_only_connections_that_keep_bytes_and_releases_below_three_quarters() -> None:
    budget = tunnel._BufferBudget(1000)
    stalled, idle, other = _FakeConnection(), _FakeConnection(), _FakeConnection()
    conns = cast(list[tunnel._HboneProtocol], [stalled, idle, other])
    budget.changed(conns[0], 600)
    budget.changed(conns[2], 300)
    assert not (stalled.held or other.held or budget.over)
    budget.changed(conns[0], 200)  # 1100 > 1000
    assert budget.over and budget.exceeded == 1
    assert stalled.held and other.held and not idle.held, "a connection that keeps nothing is never held"
    budget.changed(conns[2], -300)  # other keeps nothing now: released though the total (800) is still high
    assert not other.held and stalled.held and budget.over
    budget.changed(conns[1], 10)  # a connection starting to keep bytes while over the budget is held at once
    assert idle.held
    budget.changed(conns[0], -60)  # 750: at three quarters, everyone goes again
    assert not (budget.over or stalled.held or idle.held)
    budget.changed(conns[0], 300)  # 1050: over again, counted again
    assert budget.exceeded == 2 and stalled.held and idle.held
    budget.changed(conns[0], -1040)
    budget.changed(conns[1], -10)
    assert budget.total == 0 and not budget.over and not (stalled.held or idle.held)
