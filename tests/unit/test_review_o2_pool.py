"""Reviewer O2: HboneConnectionPool against ztunnel's pool (src/proxy/pool.rs, src/proxy/h2/client.rs).

A stream the peer refused is retried on another connection, and the refusing one takes no new streams (ztunnel's
checkout drops a connection that is not ready_to_use and makes a new one); waiters that hold a context replaced by
a renewal use the connection made with the current one (ztunnel's ConnSpawner fetches the current certificate for
every new connection, whoever asked for it).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from agent import pool as pool_module
from agent.hbone import _GOAWAY, _SETTING, GOAWAY, S_MAX_CONCURRENT_STREAMS, SETTINGS, ErrorCode, _frame
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import ConnectRequest, HboneConnectError, TunnelStats
from bench.hbone_micro import forward_to_authority
from common.spiffe import Identity
from tests.support.hbone_testbed import Backend, HboneServer, roundtrip
from tests.support.pki import TestCA


class Mesh:
    def __init__(self) -> None:
        self.ca = TestCA()
        self.client_id = self.ca.identity("default", "client")
        self.server_id = self.ca.identity("default", "server")
        self.server_ctx = self.ca.server_context(self.ca.issue(self.server_id))

    def client_ctx(self) -> ssl.SSLContext:
        """A client context with a certificate of its own: what CertificateManager hands out after each renewal."""
        return self.ca.client_context(self.ca.issue(self.client_id))

    def key(self, server: HboneServer) -> PoolKey:
        return PoolKey(self.client_id, self.server_id, server.addr)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh()


def refuse(req: ConnectRequest) -> None:
    """RST_STREAM(REFUSED_STREAM) for a CONNECT: what a peer over its stream limit (or shedding load) sends. The
    client may send the request again, on another connection (RFC 9113 8.7)."""
    st = req._stream
    st._on_reset("refused by the test")
    req._proto.h2.reset_stream(req.stream_id, ErrorCode.REFUSED_STREAM)
    req._proto.flush()
    req._proto.forget_if_closed(st)


@pytest.fixture
async def refusing_first(mesh: Mesh) -> AsyncIterator[HboneServer]:
    """A server that refuses every stream on the first connection it accepts and serves the others."""
    first: list[Any] = []

    async def handler(req: ConnectRequest) -> None:
        if not first:
            first.append(req._proto)
        if req._proto is first[0]:
            refuse(req)
            return
        await forward_to_authority(req)

    s = await HboneServer(mesh.server_ctx, handler=handler).start()
    yield s
    await s.close()


async def _until(cond: Any) -> bool:
    for _ in range(200):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return bool(cond())


async def test_a_refused_stream_is_retried_on_another_connection(
    mesh: Mesh,
    refusing_first: HboneServer,
    echo: Backend,
) -> None:
    """The retry of a refused stream went back to the connection that refused it (still usable, free slots), was
    refused again and failed the user connection with 503; the refusing connection went on taking new streams."""
    pool = HboneConnectionPool(stats=TunnelStats())
    ctx = mesh.client_ctx()
    try:
        stream = await pool.open_stream(mesh.key(refusing_first), ctx, echo.addr, [])
        assert await roundtrip(stream) == b"hello"
        assert refusing_first.connections == 2 and pool.connections_created == 2
        assert len(refusing_first.requests) == 2, "one refused, one served"
        # the refusing connection takes no new stream and closes (it has none left)
        assert await _until(lambda: refusing_first.stats.connections_closed == 1)
        later = await pool.open_stream(mesh.key(refusing_first), ctx, echo.addr, [])
        assert await roundtrip(later) == b"hello"
        assert pool.connections_created == 2 and len(refusing_first.requests) == 3
        assert [c["retired"] for c in pool.snapshot()] == [False]
    finally:
        await pool.close()


async def test_a_connection_that_refused_a_stream_keeps_its_open_streams(
    mesh: Mesh,
    echo: Backend,
) -> None:
    """Refusing one stream does not cut the others on that connection: it takes no new ones and closes with its
    last open stream."""
    refuse_next = False

    async def handler(req: ConnectRequest) -> None:
        nonlocal refuse_next
        if refuse_next:
            refuse_next = False
            refuse(req)
            return
        await forward_to_authority(req)

    server = await HboneServer(mesh.server_ctx, handler=handler).start()
    pool = HboneConnectionPool(stats=TunnelStats())
    ctx = mesh.client_ctx()
    try:
        busy = await pool.open_stream(mesh.key(server), ctx, echo.addr, [])
        refuse_next = True
        retried = await pool.open_stream(mesh.key(server), ctx, echo.addr, [])
        assert pool.connections_created == 2 and server.connections == 2
        first = [c for c in pool.snapshot() if c["retired"]]
        assert len(first) == 1 and first[0]["streams"] == 1
        assert server.stats.connections_closed == 0
        assert await roundtrip(busy, b"still") == b"still"
        assert await _until(lambda: server.stats.connections_closed == 1), "closes with its last stream"
        assert await roundtrip(retried) == b"hello"
    finally:
        await pool.close()
        await server.close()


async def test_a_waiter_holding_a_replaced_context_uses_the_current_connection(
    mesh: Mesh,
    echo: Backend,
) -> None:
    """A caller that got its context before a renewal (a waiter on a handshake, a retry) retired the connection made
    with the renewed certificate and dialled again with its old one: the connection presented the old certificate
    again, and the next caller with the current context retired that one in turn."""
    server = await HboneServer(mesh.server_ctx).start()
    pool = HboneConnectionPool(stats=TunnelStats())
    old, new = mesh.client_ctx(), mesh.client_ctx()
    try:
        assert await roundtrip(await pool.open_stream(mesh.key(server), old, echo.addr, [])) == b"hello"
        assert await roundtrip(await pool.open_stream(mesh.key(server), new, echo.addr, [])) == b"hello"
        assert pool.connections_created == 2  # renewed: the old connection is retired
        late = await pool.open_stream(mesh.key(server), old, echo.addr, [])  # a caller still holding `old`
        assert await roundtrip(late) == b"hello"
        assert pool.connections_created == 2, "the connection made with the current certificate serves it"
        again = await pool.open_stream(mesh.key(server), new, echo.addr, [])
        assert await roundtrip(again) == b"hello"
        assert pool.connections_created == 2 and server.connections == 2
        assert [c["retired"] for c in pool.snapshot()] == [False]
    finally:
        await pool.close()
        await server.close()


class _Gated:
    """A fake connection for handshakes the test completes one by one."""

    peer_identity = Identity("cluster.local", "default", "server")
    local_ip = "127.0.0.1"

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.usable = True
        self.streams = 0
        self.closed = asyncio.get_running_loop().create_future()
        self.cb: Any = None

    @property
    def active_streams(self) -> int:
        return self.streams

    @property
    def available_streams(self) -> int:
        return 100 if self.usable else 0

    def set_stream_count_callback(self, cb: Any) -> None:
        self.cb = cb

    async def open_stream(self, *args: Any) -> Any:
        self.streams += 1
        return self

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    def close(self) -> None:
        self.usable = False
        if not self.closed.done():
            self.closed.set_result(None)


async def test_waiters_across_a_renewal_end_on_one_connection_with_the_new_certificate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Callers wait on a handshake made with the old context when the certificate is renewed; a caller with the new
    context arrives meanwhile. Each wake-up retired what the other side had just opened: every connection but the
    last was a wasted handshake, and the old certificate was dialled again after the renewal."""
    made: list[_Gated] = []
    gates: list[asyncio.Future[None]] = []

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        gate = asyncio.get_running_loop().create_future()
        gates.append(gate)
        await gate
        conn = _Gated(ctx)
        made.append(conn)
        return conn

    async def release_all() -> None:
        for _ in range(20):  # a bounded number of handshakes, each completed in turn
            await asyncio.sleep(0)
            for g in gates:
                if not g.done():
                    g.set_result(None)
            await asyncio.sleep(0)

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    p = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(Identity("cluster.local", "a", "client"), _Gated.peer_identity, ("10.2.0.7", 15008))
    old, new = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    first = asyncio.ensure_future(p.open_stream(key, old, "10.2.0.7:8080", []))
    assert await _until(lambda: len(gates) == 1)  # the old-context handshake is under way
    renewed = asyncio.ensure_future(p.open_stream(key, new, "10.2.0.7:8080", []))
    await asyncio.sleep(0)
    stale = asyncio.ensure_future(p.open_stream(key, old, "10.2.0.7:8080", []))  # e.g. a retry, holding `old`
    await asyncio.sleep(0)
    await release_all()
    streams: list[Any] = list(await asyncio.gather(first, renewed, stale))
    assert {s.ctx for s in streams} == {new}, "every caller ends on the connection with the new certificate"
    assert [c.ctx for c in made].count(old) <= 1, "the old certificate is never dialled after the renewal"
    assert len(made) <= 2
    assert p.connection_count() == 1
    await p.close()


async def test_a_new_connection_retired_by_a_renewal_is_no_failure_for_its_waiters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The waiters of a handshake whose connection another waiter retired (its context was replaced meanwhile)
    found it closed and failed as if the peer had closed it ('new connection closed before use')."""
    gates: list[asyncio.Future[None]] = []

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        gate = asyncio.get_running_loop().create_future()
        gates.append(gate)
        await gate
        return _Gated(ctx)

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    p = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(Identity("cluster.local", "a", "client"), _Gated.peer_identity, ("10.2.0.7", 15008))
    old, new = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    waiters = [asyncio.ensure_future(p.open_stream(key, old, "10.2.0.7:8080", [])) for _ in range(3)]
    assert await _until(lambda: len(gates) == 1)
    late = asyncio.ensure_future(p.open_stream(key, new, "10.2.0.7:8080", []))
    for _ in range(10):
        await asyncio.sleep(0)
        for g in gates:
            if not g.done():
                g.set_result(None)
    results = await asyncio.gather(*waiters, late, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert {cast(Any, r).ctx for r in results} == {new}
    await p.close()


async def test_a_retryable_failure_of_a_new_connection_still_fails_once_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guard: a new connection gone before use still fails the attempt (bcb0d3a), also with contexts tracked."""

    class Gone(_Gated):
        def __init__(self, ctx: ssl.SSLContext) -> None:
            super().__init__(ctx)
            self.close()

    dials = 0

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        nonlocal dials
        dials += 1
        if dials > 10:
            raise RuntimeError("still dialling")
        return Gone(ctx)

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    p = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(Identity("cluster.local", "a", "client"), _Gated.peer_identity, ("10.2.0.7", 15008))
    with pytest.raises(HboneConnectError):
        await p.open_stream(key, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "10.2.0.7:8080", [])
    assert dials == 2
    await p.close()


async def test_a_stream_refused_over_the_peers_lowered_limit_leaves_the_connection_pooled(
    mesh: Mesh,
    echo: Backend,
) -> None:
    """A peer may lower its MAX_CONCURRENT_STREAMS and refuse the streams over it that were already on their way
    (RFC 9113 5.1.2): that connection is full, not bad. The retry goes to a new connection, and the first one keeps
    serving once its streams end."""
    served: dict[Any, int] = {}

    async def handler(req: ConnectRequest) -> None:
        n = served[req._proto] = served.get(req._proto, 0) + 1
        if n == 3:  # the limit goes down to 2 as the third stream arrives
            req._proto.h2._out.append(_frame(SETTINGS, 0, 0, _SETTING.pack(S_MAX_CONCURRENT_STREAMS, 2)))
            refuse(req)
            return
        await forward_to_authority(req)

    server = await HboneServer(mesh.server_ctx, handler=handler).start()
    pool = HboneConnectionPool(stats=TunnelStats())
    ctx = mesh.client_ctx()
    try:
        streams = [await pool.open_stream(mesh.key(server), ctx, echo.addr, []) for _ in range(3)]
        assert pool.connections_created == 2 and len(served) == 2
        assert [c["retired"] for c in pool.snapshot()] == [False, False]
        for s in streams:
            assert await roundtrip(s) == b"hello"
        assert await _until(lambda: pool.stream_count() == 0)
        again = await pool.open_stream(mesh.key(server), ctx, echo.addr, [])
        assert await roundtrip(again) == b"hello"
        assert pool.connections_created == 2 and server.stats.connections_closed == 0
        assert pool.connection_count() == 2
    finally:
        await pool.close()
        await server.close()


async def test_closing_the_pool_waits_for_all_connections_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection's graceful close (GOAWAY, TLS close_notify) got its own wait of up to 2 s, one after the
    other: against peers that no longer answer (a partitioned node; the TLS shutdown waits for the peer's
    close_notify) the agent's shutdown took 2 s per pooled connection. One deadline for all, then the rest are
    aborted."""
    events: list[str] = []

    class Hung(_Gated):
        def __init__(self, ctx: ssl.SSLContext, n: int) -> None:
            super().__init__(ctx)
            self.n = n

        def close(self) -> None:
            self.usable = False  # GOAWAY sent, close_notify never answered: not closed yet

        async def wait_closed(self) -> None:
            events.append(f"wait {self.n}")
            await asyncio.shield(self.closed)

        def abort(self) -> None:
            events.append(f"abort {self.n}")
            if not self.closed.done():
                self.closed.set_result(None)

    made = 0

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        nonlocal made
        made += 1
        return Hung(ctx, made)

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    monkeypatch.setattr(HboneConnectionPool, "close_timeout", 0.05)
    p = HboneConnectionPool(stats=TunnelStats())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for i in range(3):
        key = PoolKey(Identity("cluster.local", "a", "client"), _Gated.peer_identity, (f"10.2.0.{i}", 15008))
        await p.open_stream(key, ctx, f"10.2.0.{i}:8080", [])
    await p.close()
    waits = [i for i, e in enumerate(events) if e.startswith("wait")]
    aborts = [i for i, e in enumerate(events) if e.startswith("abort")]
    assert len(aborts) == 3
    assert max(waits) < min(aborts), f"a connection waited only after another's deadline: {events}"


async def test_a_source_keeps_at_most_max_connections_pooled_least_recently_used_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ztunnel's pool holds at most 500 connections per source workload (src/proxy/pool.rs:
    pingora_pool::ConnectionPool::new(500), an LRU that drops the least recently checked-in connection over it).
    Ours had no bound: a pod fanning out to thousands of destinations (a scraper every 30 s, under the 300 s idle
    timeout) kept a TLS connection open to each for good."""
    made: list[_Gated] = []

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        made.append(_Gated(ctx))
        return made[-1]

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    caplog.set_level(logging.DEBUG, logger="agent.pool")
    p = HboneConnectionPool(stats=TunnelStats())
    p.max_connections_per_source = 2  # 500 by default
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    src, other = Identity("cluster.local", "a", "client"), Identity("cluster.local", "a", "other")

    def key(n: int, source: Identity = src) -> PoolKey:
        return PoolKey(source, _Gated.peer_identity, (f"10.2.0.{n}", 15008))

    for n in (1, 2):
        await p.open_stream(key(n), ctx, "x:1", [])
    await p.open_stream(key(1), ctx, "x:1", [])  # 1 is now the most recently used
    await p.open_stream(key(3), ctx, "x:1", [])
    assert p.connection_count() == 2 and {c["addr"] for c in p.snapshot() if not c["retired"]} == {
        "10.2.0.1:15008",
        "10.2.0.3:15008",
    }
    assert [c["addr"] for c in p.snapshot() if c["retired"]] == ["10.2.0.2:15008"], "its stream still open"
    await p.open_stream(key(1, other), ctx, "x:1", [])  # another source has a limit of its own
    assert p.connection_count() == 3 and len(made) == 4
    await p.open_stream(key(2), ctx, "x:1", [])
    assert len(made) == 5, "the evicted connection is not used again"
    # a pod fanning out evicts on every new connection: not a line at INFO each time
    retired = [r for r in caplog.records if "retired" in r.getMessage()]
    assert retired and all(r.levelno == logging.DEBUG for r in retired)
    await p.close()


async def test_streams_above_a_goaways_last_stream_id_are_retried_on_a_new_connection(
    mesh: Mesh,
    echo: Backend,
) -> None:
    """Guard (passes before and after): a GOAWAY whose last-stream-id is below streams the client already sent says
    the peer never processed them (RFC 9113 6.8): they are retried on a new connection, the connection that went
    away takes none, and it closes once nothing is left on it."""
    first: list[Any] = []

    async def handler(req: ConnectRequest) -> None:
        if not first:
            first.append(req._proto)
        if req._proto is first[0]:
            # GOAWAY(NO_ERROR, last-stream-id 0): none of the client's streams on this connection was processed
            req._proto.h2._out.append(_frame(GOAWAY, 0, 0, _GOAWAY.pack(0, 0)))
            req._proto.flush()
            await asyncio.Event().wait()  # never answered: the client must not wait for it
        await forward_to_authority(req)

    server = await HboneServer(mesh.server_ctx, handler=handler).start()
    pool = HboneConnectionPool(stats=TunnelStats())
    ctx = mesh.client_ctx()
    try:
        streams = await asyncio.gather(*(pool.open_stream(mesh.key(server), ctx, echo.addr, []) for _ in range(3)))
        assert pool.connections_created == 2 and server.connections == 2
        for s in streams:
            assert await roundtrip(s) == b"hello"
        assert [c["usable"] for c in pool.snapshot()] == [True]
        assert await _until(lambda: server.stats.connections_closed == 1)
    finally:
        await pool.close()
        await server.close()


async def test_a_peer_allowing_no_streams_fails_the_attempt_instead_of_dialling_without_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer may advertise SETTINGS_MAX_CONCURRENT_STREAMS 0 (RFC 9113 6.5.2: 'no new streams for now', an
    overloaded server). The opener found its new connection full and dialled another, and another: a loop of
    handshakes for one user connection, as long as the peer kept saying 0. A new connection that takes no stream
    at all fails the attempt (ztunnel hands a new connection to its maker, whose request then waits on it)."""
    dials = 0

    class NoStreams(_Gated):
        @property
        def available_streams(self) -> int:
            return 0

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        nonlocal dials
        dials += 1
        if dials > 10:
            raise RuntimeError("still dialling")
        return NoStreams(ctx)

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    p = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(Identity("cluster.local", "a", "client"), _Gated.peer_identity, ("10.2.0.7", 15008))
    with pytest.raises(HboneConnectError) as err:
        await p.open_stream(key, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), "10.2.0.7:8080", [])
    assert err.value.status == 503 and "no streams" in err.value.reason
    assert dials == 1
    await p.close()


async def test_openers_beyond_a_new_connections_stream_limit_still_get_another_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guard for the above: openers that shared a handshake and found the new connection full (by the peer's
    limit, once the first took their streams) dial another connection as before."""

    class Two(_Gated):
        @property
        def available_streams(self) -> int:
            return 2 - self.streams

    made: list[_Gated] = []

    async def fake_connect(addr: Any, ctx: ssl.SSLContext, *args: Any, **kwargs: Any) -> _Gated:
        made.append(Two(ctx))
        return made[-1]

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    p = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(Identity("cluster.local", "a", "client"), _Gated.peer_identity, ("10.2.0.7", 15008))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    await asyncio.gather(*(p.open_stream(key, ctx, "10.2.0.7:8080", []) for _ in range(5)))
    assert [c.streams for c in made] == [2, 2, 1]
    await p.close()
