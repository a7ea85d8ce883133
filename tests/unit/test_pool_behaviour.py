"""HboneConnectionPool against a real Ambit HBONE server on 127.0.0.1 (TLS, no privileges needed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from agent.hbone import MAX_STREAM_ID, PREFACE, SETTINGS
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import HboneConnectError, TunnelConfig, TunnelStats
from common.spiffe import Identity
from tests.support.hbone_testbed import Backend, HboneServer, roundtrip
from tests.support.pki import TestCA


class Mesh:
    def __init__(self) -> None:
        self.ca = TestCA()
        self.client_id = self.ca.identity("default", "client")
        self.server_id = self.ca.identity("default", "server")
        self.client_ctx = self.ca.client_context(self.ca.issue(self.client_id))
        self.server_ctx = self.ca.server_context(self.ca.issue(self.server_id))

    def key(self, server: HboneServer, dst: Identity | None = None) -> PoolKey:
        return PoolKey(self.client_id, dst or self.server_id, server.addr)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh()


@pytest.fixture
async def server(mesh: Mesh) -> AsyncIterator[HboneServer]:
    s = await HboneServer(mesh.server_ctx).start()
    yield s
    await s.close()


async def test_concurrent_openers_share_one_handshake(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    pool = HboneConnectionPool(stats=TunnelStats())
    streams = await asyncio.gather(
        *(pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, []) for _ in range(50))
    )
    assert pool.connections_created == 1 and server.connections == 1
    assert pool.stream_count() == 50
    results = await asyncio.gather(*(roundtrip(s, b"n%d" % i) for i, s in enumerate(streams)))
    assert results == [b"n%d" % i for i in range(50)]
    assert pool.stream_count() == 0 and pool.connection_count() == 1
    await pool.close()


async def test_stream_limit_opens_more_connections(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    pool = HboneConnectionPool(max_streams_per_conn=3, stats=TunnelStats())
    streams = [await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, []) for _ in range(7)]
    assert pool.connection_count() == 3 and server.connections == 3
    assert sorted(int(str(c["streams"])) for c in pool.snapshot()) == [1, 3, 3]
    for s in streams:
        assert await roundtrip(s) == b"hello"
    # freed slots are reused: no new handshake
    again = await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    assert await roundtrip(again) == b"hello"
    assert pool.connections_created == 3
    await pool.close()


async def test_keys_are_not_shared(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    pool = HboneConnectionPool(stats=TunnelStats())
    other_src = mesh.ca.identity("other", "client")
    other_ctx = mesh.ca.client_context(mesh.ca.issue(other_src))
    s1 = await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    s2 = await pool.open_stream(PoolKey(other_src, mesh.server_id, server.addr), other_ctx, echo.addr, [])
    assert pool.connection_count() == 2
    assert {r.peer_identity for r in server.requests} == {mesh.client_id, other_src}
    assert await roundtrip(s1) == b"hello" and await roundtrip(s2) == b"hello"
    await pool.close()


async def test_each_source_address_has_its_own_connections(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    """As ztunnel's WorkloadKey (its source IP): a connection leaves from its client pod's address, which the peer
    judges, so two pods of one identity never share one; the same pod's streams do."""
    pool = HboneConnectionPool(stats=TunnelStats())
    keys = [PoolKey(mesh.client_id, mesh.server_id, server.addr, source=ip) for ip in ("127.0.0.2", "127.0.0.3")]
    streams = [await pool.open_stream(k, mesh.client_ctx, echo.addr, []) for k in (*keys, keys[0])]
    assert pool.connection_count() == 2 and server.connections == 2
    assert sorted(str(c["source"]) for c in pool.snapshot()) == ["127.0.0.2", "127.0.0.3"]
    for s in streams:
        assert await roundtrip(s) == b"hello"
    await pool.close()


async def test_idle_connections_are_released(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    pool = HboneConnectionPool(idle_timeout=0.2, stats=TunnelStats())
    s = await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    await asyncio.sleep(0.4)
    assert pool.connection_count() == 1, "a connection with an open stream is not idle"
    assert await roundtrip(s) == b"hello"
    for _ in range(100):
        await asyncio.sleep(0.05)
        if pool.connection_count() == 0 and server.stats.connections_closed == 1:
            break
    assert pool.connection_count() == 0
    assert server.stats.connections_closed == 1  # really closed, not just forgotten
    await pool.close()


async def test_goaway_evicts_and_reconnects(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    pool = HboneConnectionPool(stats=TunnelStats())
    s = await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    assert await roundtrip(s) == b"hello"
    # The server drains: GOAWAY(NO_ERROR) then close. The pool must not hand out that connection again.
    req = server.requests[-1]
    req._proto.close()  # the connection-level close PROXY would do on shutdown
    for _ in range(50):
        await asyncio.sleep(0.02)
        if pool.connection_count() == 0:
            break
    assert pool.connection_count() == 0
    s2 = await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    assert await roundtrip(s2) == b"hello"
    assert pool.connections_created == 2
    await pool.close()


async def test_wrong_server_identity_is_refused(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    stats = TunnelStats()
    pool = HboneConnectionPool(stats=stats)
    impostor = mesh.ca.identity("default", "somebody-else")
    with pytest.raises(HboneConnectError) as err:
        await pool.open_stream(mesh.key(server, impostor), mesh.client_ctx, echo.addr, [])
    assert err.value.status == 503 and "wrong_identity" in err.value.reason
    assert stats.rejects["wrong_identity"] == 1
    assert pool.connection_count() == 0 and not server.requests
    await pool.close()


@pytest.mark.parametrize("status", [400, 401, 503])
async def test_peer_status_is_propagated(mesh: Mesh, echo: Backend, status: int) -> None:
    server = await HboneServer(mesh.server_ctx, status=status).start()
    pool = HboneConnectionPool(stats=TunnelStats())
    try:
        with pytest.raises(HboneConnectError) as err:
            await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
        assert err.value.status == status
        assert pool.stream_count() == 0 and pool.connection_count() == 1  # the connection itself is fine
    finally:
        await pool.close()
        await server.close()


async def test_connect_failure_is_shared_by_waiters(mesh: Mesh) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()  # nothing listens here once closed
    pool = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(mesh.client_id, mesh.server_id, dead)
    results = await asyncio.gather(
        *(pool.open_stream(key, mesh.client_ctx, "127.0.0.1:1", []) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, HboneConnectError) and r.status == 503 for r in results)
    assert pool.connect_failures == 1


async def test_keepalive_drops_a_silent_peer(mesh: Mesh) -> None:
    """A TLS peer that completes the handshake and sends SETTINGS but never answers PING is dropped."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x00\x00" + bytes([SETTINGS]) + b"\x00\x00\x00\x00\x00")
        await reader.readexactly(len(PREFACE))
        while await reader.read(65536):
            pass  # swallow everything, answer nothing

    srv = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=mesh.server_ctx)
    port = srv.sockets[0].getsockname()[1]
    stats = TunnelStats()
    config = TunnelConfig(keepalive_interval=0.1, keepalive_timeout=0.3)
    pool = HboneConnectionPool(config=config, stats=stats)
    key = PoolKey(mesh.client_id, mesh.server_id, ("127.0.0.1", port))
    try:
        with pytest.raises(HboneConnectError):
            # no response ever comes either; the keepalive kills the connection before connect_timeout
            await pool.open_stream(key, mesh.client_ctx, "127.0.0.1:1", [])
        assert stats.errors["keepalive_timeout"] == 1
        assert pool.connection_count() == 0
        assert stats.streams_opened == stats.streams_closed == 1  # the stream died with its connection
    finally:
        await pool.close()
        srv.close()


async def test_closed_pool_refuses(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    pool = HboneConnectionPool(stats=TunnelStats())
    s = await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    await pool.close()
    with pytest.raises(HboneConnectError):
        await pool.open_stream(mesh.key(server), mesh.client_ctx, echo.addr, [])
    assert s.closed


async def test_connection_out_of_stream_ids_is_replaced_and_drained(
    mesh: Mesh, server: HboneServer, echo: Backend
) -> None:
    """A connection whose client stream ids ran out (2^31-1 used, RFC 9113 5.1.1) can open no more streams: the
    pool must open a new connection instead of choosing it again (every later stream failed with 503), and close
    the old one once its last stream ended."""
    pool = HboneConnectionPool(stats=TunnelStats())
    key = mesh.key(server)
    first = await pool.open_stream(key, mesh.client_ctx, echo.addr, [])
    [old] = pool._conns[key]
    old.conn._proto.h2._next_stream_id = MAX_STREAM_ID + 2  # as after ~2^30 streams
    second = await pool.open_stream(key, mesh.client_ctx, echo.addr, [])
    assert pool.connections_created == 2
    assert await roundtrip(second) == b"hello"
    assert await roundtrip(first) == b"hello"  # the old connection still carries what it had
    for _ in range(100):
        if pool.connection_count() == 1:
            break
        await asyncio.sleep(0.02)
    assert pool.connection_count() == 1 and old not in pool._conns[key]
    await pool.close()


async def test_a_service_san_is_accepted_and_keyed_apart(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    """A destination reached through a service with subject_alt_names may prove one of those instead of its own
    identity (ztunnel's upstream_sans); a connection verified that way serves only requests accepting the same set:
    a request expecting the workload identity alone gets a handshake of its own, and is refused."""
    stats = TunnelStats()
    pool = HboneConnectionPool(stats=stats)
    workload = mesh.ca.identity("default", "the-pod")  # what the store says; the server proves mesh.server_id
    via_service = PoolKey(mesh.client_id, workload, server.addr, frozenset({mesh.server_id}))
    stream = await pool.open_stream(via_service, mesh.client_ctx, echo.addr, [])
    assert await roundtrip(stream) == b"hello"
    assert [c["peer"] for c in pool.snapshot()] == [str(mesh.server_id)]
    with pytest.raises(HboneConnectError) as err:
        await pool.open_stream(PoolKey(mesh.client_id, workload, server.addr), mesh.client_ctx, echo.addr, [])
    assert "wrong_identity" in err.value.reason and stats.rejects["wrong_identity"] == 1
    other_sans = PoolKey(mesh.client_id, workload, server.addr, frozenset({mesh.ca.identity("default", "other")}))
    with pytest.raises(HboneConnectError):
        await pool.open_stream(other_sans, mesh.client_ctx, echo.addr, [])
    assert pool.connections_created == 1 and server.connections == 3
    again = await pool.open_stream(via_service, mesh.client_ctx, echo.addr, [])  # the verified one is reused
    assert await roundtrip(again) == b"hello" and pool.connections_created == 1
    await pool.close()


def test_sans_naming_the_workload_itself_are_the_same_key(mesh: Mesh) -> None:
    addr = ("127.0.0.1", 15008)
    plain = PoolKey(mesh.client_id, mesh.server_id, addr)
    assert PoolKey(mesh.client_id, mesh.server_id, addr, frozenset({mesh.server_id})) == plain
    other = mesh.ca.identity("default", "other")
    with_other = PoolKey(mesh.client_id, mesh.server_id, addr, frozenset({mesh.server_id, other}))
    assert with_other != plain and with_other.also == {other}
    assert with_other.accepted == {mesh.server_id, other}


def _peer_leaf(req: object) -> bytes:
    """DER of the client certificate the server saw on the connection carrying ``req``."""
    ssl_obj = req._proto.transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
    der: bytes = ssl_obj.getpeercert(binary_form=True)
    return der


async def _closed_count(server: HboneServer, want: int) -> int:
    for _ in range(100):
        if server.stats.connections_closed >= want:
            break
        await asyncio.sleep(0.02)
    return server.stats.connections_closed


async def test_a_renewed_certificate_retires_the_connections_made_with_the_old_one(
    mesh: Mesh, server: HboneServer, echo: Backend
) -> None:
    """A renewal hands the pool a new context for the same key: new streams go on a connection made with it, the
    old connection keeps its open stream and closes with it (a busy connection never goes idle, and would otherwise
    present the old certificate for as long as the pod keeps talking)."""
    pool = HboneConnectionPool(stats=TunnelStats())
    old_ctx = mesh.ca.client_context(mesh.ca.issue(mesh.client_id))
    long_lived = await pool.open_stream(mesh.key(server), old_ctx, echo.addr, [])
    old_cert = _peer_leaf(server.requests[-1])

    new_ctx = mesh.ca.client_context(mesh.ca.issue(mesh.client_id))  # renewed: same identity, new certificate
    fresh = await pool.open_stream(mesh.key(server), new_ctx, echo.addr, [])
    assert pool.connections_created == 2 and server.connections == 2
    assert _peer_leaf(server.requests[-1]) != old_cert
    retired = [c for c in pool.snapshot() if c["retired"]]
    assert len(retired) == 1 and retired[0]["streams"] == 1
    assert await roundtrip(long_lived, b"old") == b"old"
    assert await _closed_count(server, 1) == 1, "the retired connection closes with its last stream"
    assert await roundtrip(fresh) == b"hello"
    again = await pool.open_stream(mesh.key(server), new_ctx, echo.addr, [])
    assert pool.connections_created == 2, "the new connection is pooled as usual"
    assert await roundtrip(again) == b"hello"
    assert [c["retired"] for c in pool.snapshot()] == [False]
    await pool.close()


async def test_an_idle_connection_of_a_replaced_context_closes_at_once(
    mesh: Mesh, server: HboneServer, echo: Backend
) -> None:
    pool = HboneConnectionPool(stats=TunnelStats())
    old_ctx = mesh.ca.client_context(mesh.ca.issue(mesh.client_id))
    assert await roundtrip(await pool.open_stream(mesh.key(server), old_ctx, echo.addr, [])) == b"hello"
    new_ctx = mesh.ca.client_context(mesh.ca.issue(mesh.client_id))
    assert await roundtrip(await pool.open_stream(mesh.key(server), new_ctx, echo.addr, [])) == b"hello"
    assert await _closed_count(server, 1) == 1
    assert pool.connection_count() == 1 and len(pool.snapshot()) == 1
    await pool.close()
