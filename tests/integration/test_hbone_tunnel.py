"""Ambit HBONE client and server end to end on 127.0.0.1: plain TCP -> relay -> pooled HBONE over mTLS ->
serve_hbone_connection -> relay -> backend. Bytes are hash-checked; bad peers are refused with counted reasons
while everything else keeps working."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import pytest

from agent.hbone import DataReceived, ErrorCode, HboneConnection, ResponseReceived, StreamEnded, StreamReset
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import ConnectRequest, HboneStream, HboneStreamReset, relay
from tests.support.hbone_testbed import Backend, HboneServer, digest
from tests.support.loops import BOTH_LOOPS, event_loop_policy  # noqa: F401  (fixture)
from tests.support.pki import TestCA
from tests.support.waiting import drain_until_closed


class Mesh:
    def __init__(self) -> None:
        self.ca = TestCA()
        self.client_id = self.ca.identity("default", "client")
        self.server_id = self.ca.identity("default", "server")
        self.client_leaf = self.ca.issue(self.client_id)
        self.client_ctx = self.ca.client_context(self.client_leaf)
        self.server_ctx = self.ca.server_context(self.ca.issue(self.server_id))


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh()


pytestmark = BOTH_LOOPS  # every test runs on asyncio and on uvloop


@pytest.fixture
async def server(mesh: Mesh) -> AsyncIterator[HboneServer]:
    s = await HboneServer(mesh.server_ctx).start()
    yield s
    await s.close()


class ClientProxy:
    """The outbound side: plain TCP listener whose connections are relayed into pooled HBONE streams."""

    def __init__(self, pool: HboneConnectionPool, key: PoolKey, ctx: ssl.SSLContext, target: str) -> None:
        self.pool, self.key, self.ctx, self.target = pool, key, ctx, target
        self.results: list[object] = []
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(256)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.tasks: set[asyncio.Task[None]] = set()
        self.tasks.add(asyncio.ensure_future(self._accept()))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.lsock)
            sock.setblocking(False)
            task = asyncio.ensure_future(self._one(sock))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _one(self, sock: socket.socket) -> None:
        stream = await self.pool.open_stream(self.key, self.ctx, self.target, [("forwarded", 'for="127.0.0.1"')])
        self.results.append(await relay(sock, stream))

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.lsock.close()


async def tcp_echo_roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    data = await reader.read(-1)  # until the tunnel delivers the backend's FIN
    await sender
    writer.close()
    return data


async def test_hundred_concurrent_streams_of_one_megabyte(
    mesh: Mesh, server: HboneServer, echo: Backend, pool: HboneConnectionPool
) -> None:
    proxy = ClientProxy(pool, PoolKey(mesh.client_id, mesh.server_id, server.addr), mesh.client_ctx, echo.addr)
    try:
        payloads = [os.urandom(1024 * 1024) for _ in range(100)]
        results = await asyncio.gather(*(tcp_echo_roundtrip(proxy.port, p) for p in payloads))
        assert [digest(r) for r in results] == [digest(p) for p in payloads]
        assert pool.connections_created == 1  # 100 streams fit the default per-connection limit
        assert len(server.requests) == 100
        assert {r.peer_identity for r in server.requests} == {mesh.client_id}
        assert all(r.header("forwarded") == 'for="127.0.0.1"' for r in server.requests)
        for _ in range(100):
            if len(proxy.results) == 100:
                break
            await asyncio.sleep(0.02)
        assert all(r.error is None and r.bytes_up == r.bytes_down == 1024 * 1024 for r in proxy.results)  # type: ignore[attr-defined]
    finally:
        await proxy.close()


async def test_stream_whose_backend_never_reads_does_not_block_others(
    mesh: Mesh, server: HboneServer, echo: Backend, pool: HboneConnectionPool
) -> None:
    stall = await Backend("stall").start()
    key = PoolKey(mesh.client_id, mesh.server_id, server.addr)
    try:
        stuck = await pool.open_stream(key, mesh.client_ctx, stall.addr, [])
        stuck_writer = asyncio.ensure_future(stuck.write(os.urandom(48 * 1024 * 1024)))
        await asyncio.sleep(0.3)
        assert not stuck_writer.done(), "48 MiB cannot fit into a backend that never reads"
        others = [await pool.open_stream(key, mesh.client_ctx, echo.addr, []) for _ in range(5)]

        async def one(stream: HboneStream, payload: bytes) -> bytes:
            await stream.write(payload)
            stream.write_eof()
            out = bytearray()
            while chunk := await stream.read():
                out += chunk
            return bytes(out)

        payloads = [os.urandom(6 * 1024 * 1024) for _ in others]  # more than a stream window each
        got = await asyncio.wait_for(asyncio.gather(*(one(s, p) for s, p in zip(others, payloads, strict=True))), 60)
        assert [digest(g) for g in got] == [digest(p) for p in payloads]
        assert not stuck_writer.done()
        stuck.reset()
        with pytest.raises(HboneStreamReset):
            await stuck_writer
        assert pool.connections_created == 1
    finally:
        await stall.close()


async def test_stream_the_client_never_reads_does_not_block_others(
    mesh: Mesh, server: HboneServer, echo: Backend, pool: HboneConnectionPool
) -> None:
    key = PoolKey(mesh.client_id, mesh.server_id, server.addr)
    lazy = await pool.open_stream(key, mesh.client_ctx, echo.addr, [])
    lazy_writer = asyncio.ensure_future(lazy.write(os.urandom(24 * 1024 * 1024)))  # echoed back, never read
    await asyncio.sleep(0.3)
    payload = os.urandom(8 * 1024 * 1024)
    other = await pool.open_stream(key, mesh.client_ctx, echo.addr, [])
    writer = asyncio.ensure_future(other.write(payload))
    out = bytearray()
    while len(out) < len(payload):
        out += await asyncio.wait_for(other.read(), 30)
    await writer
    assert digest(bytes(out)) == digest(payload)
    # The lazy stream's 24 MiB may or may not fit the kernel's loopback buffers plus our 4 MiB windows; either
    # way it holds unread data and resetting it ends its writer.
    assert lazy._rbuf, "the echoed bytes wait, unread, in the lazy stream"
    lazy.reset()
    if not lazy_writer.done():
        with pytest.raises(HboneStreamReset):
            await lazy_writer


async def test_half_close_crosses_the_tunnel(
    mesh: Mesh, server: HboneServer, echo: Backend, pool: HboneConnectionPool
) -> None:
    key = PoolKey(mesh.client_id, mesh.server_id, server.addr)
    stream = await pool.open_stream(key, mesh.client_ctx, echo.addr, [])
    await stream.write(b"first")
    assert await stream.read() == b"first"  # still open both ways
    stream.write_eof()  # our FIN -> END_STREAM -> backend sees EOF and closes its side
    assert await stream.read() == b""
    assert stream.closed


async def test_cancelled_relay_resets_the_stream(mesh: Mesh, echo: Backend, pool: HboneConnectionPool) -> None:
    started = asyncio.Event()

    async def handler(req: ConnectRequest) -> None:
        host, port = echo.addr.split(":")
        up = socket.create_connection((host, int(port)))
        up.setblocking(False)
        await req.respond(200)
        task = asyncio.ensure_future(relay(up, req.stream))
        started.set()
        await asyncio.sleep(0.1)
        task.cancel()  # what a policy change does to an established connection
        with pytest.raises(asyncio.CancelledError):
            await task

    server = await HboneServer(mesh.server_ctx, handler=handler).start()
    try:
        stream = await pool.open_stream(
            PoolKey(mesh.client_id, mesh.server_id, server.addr), mesh.client_ctx, "x:1", []
        )
        await started.wait()
        with pytest.raises(HboneStreamReset):
            while await stream.read():
                pass
    finally:
        await server.close()


# ---------------------------------------------------------------------------------------------------- bad peers


async def _tls_attempt(port: int, ctx: ssl.SSLContext, send: bytes = b"") -> bytes:
    """Connect, optionally send bytes, and read until the server closes; errors count as closed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    except (ssl.SSLError, OSError):
        return b""
    try:
        if send:
            writer.write(send)
        return await asyncio.wait_for(reader.read(-1), 10)
    except (ssl.SSLError, OSError):
        return b""
    finally:
        writer.close()


async def _wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(250):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_bad_tls_clients_are_refused_and_counted(
    mesh: Mesh, server: HboneServer, echo: Backend, pool: HboneConnectionPool
) -> None:
    ca = mesh.ca
    no_cert = ca.client_context(None)
    foreign = TestCA()  # same trust domain name, different root: not trusted
    foreign_ctx = foreign.client_context(foreign.issue(foreign.identity("default", "client")), roots=[ca.root_pem])
    other_domain = ca.client_context(ca.issue(None, uri="spiffe://evil.example/ns/default/sa/client"))
    no_spiffe = ca.client_context(ca.issue(None))

    await _tls_attempt(server.port, no_cert)
    await _wait_for(lambda: server.stats.rejects["no_client_cert"] == 1)
    await _tls_attempt(server.port, foreign_ctx)
    await _wait_for(lambda: server.stats.rejects["untrusted_peer"] == 1)
    await _tls_attempt(server.port, other_domain)
    await _wait_for(lambda: server.stats.rejects["trust_domain"] == 1)
    await _tls_attempt(server.port, no_spiffe)
    await _wait_for(lambda: server.stats.rejects["untrusted_peer"] == 2)
    assert not server.requests
    # ...and a proper client is still served
    stream = await pool.open_stream(
        PoolKey(mesh.client_id, mesh.server_id, server.addr), mesh.client_ctx, echo.addr, []
    )
    await stream.write(b"ok")
    assert await stream.read() == b"ok"


async def test_garbage_after_tls_gets_goaway(mesh: Mesh, server: HboneServer) -> None:
    reply = await _tls_attempt(server.port, mesh.client_ctx, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # our SETTINGS, then GOAWAY(PROTOCOL_ERROR), then close
    assert b"\x07\x00\x00\x00\x00\x00" in reply
    await _wait_for(lambda: server.stats.rejects["protocol_error"] == 1)


_FINAL = (h2.events.ResponseReceived, h2.events.StreamReset, h2.events.ConnectionTerminated)


def _status(event: h2.events.ResponseReceived) -> str:
    for name, value in event.headers or ():
        if name in (":status", b":status"):
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


async def _h2_exchange(
    port: int, ctx: ssl.SSLContext, headers: list[tuple[str, str]], end_stream: bool
) -> list[h2.events.Event]:
    """Drive the independent ``h2`` implementation against our server; returns the events it saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    conn = _h2_client()
    conn.send_headers(1, headers, end_stream=end_stream)
    writer.write(conn.data_to_send())
    seen: list[h2.events.Event] = []
    try:
        while not any(isinstance(e, _FINAL) for e in seen):
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            seen += conn.receive_data(data)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return seen


async def test_independent_h2_client_connect_and_non_connect(mesh: Mesh, server: HboneServer, echo: Backend) -> None:
    ctx = mesh.client_ctx
    seen = await _h2_exchange(server.port, ctx, [(":method", "CONNECT"), (":authority", echo.addr)], False)
    responses = [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert responses and _status(responses[0]) == "200"
    seen = await _h2_exchange(
        server.port, ctx, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", echo.addr)], True
    )
    responses = [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert responses and _status(responses[0]) == "400"
    await _wait_for(lambda: server.stats.rejects["bad_request"] == 1)


async def test_huge_header_block_is_refused_and_counted(mesh: Mesh, server: HboneServer) -> None:
    headers = [(":method", "CONNECT"), (":authority", "127.0.0.1:1")] + [(f"x-h{i}", "v" * 4000) for i in range(40)]
    seen = await _h2_exchange(server.port, mesh.client_ctx, headers, False)
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in seen)
    await _wait_for(lambda: server.stats.rejects["header_too_large"] == 1)
    assert not server.requests


async def test_connection_churn_with_aborts_leaks_nothing(
    mesh: Mesh, server: HboneServer, echo: Backend, pool: HboneConnectionPool
) -> None:
    """Hundreds of short tunnelled connections, a third of them aborted (RST) half-way: everything is
    accounted for afterwards on both sides, and the tunnel still carries data."""
    proxy = ClientProxy(pool, PoolKey(mesh.client_id, mesh.server_id, server.addr), mesh.client_ctx, echo.addr)

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x" * (1000 + i))
        await writer.drain()
        if i % 3 == 0:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()  # RST instead of FIN
            return
        writer.write_eof()
        assert len(await reader.read(-1)) == 1000 + i
        writer.close()

    try:
        sem = asyncio.Semaphore(20)

        async def limited(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(limited(i) for i in range(300)))
        await _wait_for(lambda: pool.stream_count() == 0 and len(proxy.results) == 300)
        stats = server.stats
        await _wait_for(lambda: stats.streams_opened == stats.streams_closed == 300)
        assert pool.connections_created == 1
        assert sum(1 for r in proxy.results if getattr(r, "error", None)) >= 100 // 2  # the aborted ones
        assert await tcp_echo_roundtrip(proxy.port, b"still fine") == b"still fine"
    finally:
        await proxy.close()


@pytest.mark.parametrize("gap", [0.0, 0.2], ids=["same-read", "later-read"])
async def test_reset_no_error_after_a_complete_response_keeps_the_response(
    mesh: Mesh, pool: HboneConnectionPool, gap: float
) -> None:
    """RFC 9113 8.1: a server may end its side (END_STREAM) and then ask the client to stop sending with
    RST_STREAM(NO_ERROR), as Envoy does when the upstream finished first; the client MUST NOT discard the
    response. The relay must deliver every byte still queued for a slow TCP client and then a FIN, not abort the
    TCP connection (ztunnel reads such a reset as end of stream)."""
    payload = os.urandom(3 * 1024 * 1024)  # within the stream window: all of it is sent at once

    async def handler(req: ConnectRequest) -> None:
        await req.respond(200)
        stream = req.stream
        await stream.write(payload)
        stream.write_eof()
        if gap:
            await asyncio.sleep(gap)
        proto = req._proto
        proto.h2.reset_stream(req.stream_id, ErrorCode.NO_ERROR)
        proto.flush()

    server = await HboneServer(mesh.server_ctx, handler=handler).start()
    proxy = ClientProxy(pool, PoolKey(mesh.client_id, mesh.server_id, server.addr), mesh.client_ctx, "x:1")
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # a slow reader: the relay queues
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        await _wait_for(lambda: bool(server.requests) and server.requests[0].status == 200)
        await asyncio.sleep(0.3)  # the reset has arrived while most of the response still waits in the relay
        got = bytearray()
        async with asyncio.timeout(20):
            while chunk := await loop.sock_recv(sock, 1 << 16):
                got += chunk
        assert len(got) == len(payload) and digest(bytes(got)) == digest(payload)
        await _wait_for(lambda: len(proxy.results) == 1)
        result = proxy.results[0]
        assert result.bytes_down == len(payload) and result.error is None  # type: ignore[attr-defined]
    finally:
        sock.close()
        await proxy.close()
        await server.close()


async def test_reset_in_the_same_read_as_end_stream_still_resets_the_relay(
    mesh: Mesh, pool: HboneConnectionPool
) -> None:
    """END_STREAM and then RST_STREAM(CANCEL) arriving in one read: the reset must still reach the relay (abort,
    reported as an error), not be lost because the stream had already left the core when END_STREAM was handled
    (the relay then reported a clean close once the TCP client gave up)."""

    async def handler(req: ConnectRequest) -> None:
        await req.respond(200)
        stream = req.stream
        await stream.write(b"partial answer")
        stream.write_eof()
        stream.reset()  # RST_STREAM(CANCEL), flushed with the END_STREAM

    server = await HboneServer(mesh.server_ctx, handler=handler).start()
    proxy = ClientProxy(pool, PoolKey(mesh.client_id, mesh.server_id, server.addr), mesh.client_ctx, "x:1")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await drain_until_closed(reader)
        writer.close()
        await _wait_for(lambda: len(proxy.results) == 1)
        error = proxy.results[0].error  # type: ignore[attr-defined]
        assert error is not None and "CANCEL" in error
    finally:
        await proxy.close()
        await server.close()


async def test_thousands_of_small_data_frames_in_one_read_reach_the_backend(
    mesh: Mesh, server: HboneServer, echo: Backend
) -> None:
    """A peer may send many tiny DATA frames (an interactive client's keystrokes, queued behind a busy TLS
    connection) that arrive in one read: the relay must write them all, not pass more than the kernel's
    IOV_MAX (1024) buffers to one sendmsg, which fails with EMSGSIZE and aborted the stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=mesh.client_ctx, server_hostname="")
    conn = HboneConnection(client=True)
    conn.initiate()
    sid = conn.send_connect(echo.addr)
    writer.writelines(conn.data_to_send())
    events: list[object] = []

    async def pump_until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not done():
                data = await reader.read(1 << 16)
                assert data, "server closed"
                for ev in conn.receive_data(data):
                    events.append(ev)
                    if isinstance(ev, DataReceived):
                        conn.acknowledge(sid, len(ev.data))
                writer.writelines(conn.data_to_send())

    try:
        await pump_until(lambda: any(isinstance(e, ResponseReceived) for e in events))
        pieces = [bytes([65 + i % 26]) for i in range(3000)]
        for piece in pieces:  # one DATA frame each, all in one TLS write
            assert conn.send_data(sid, piece) == 1
        conn.end_stream(sid)
        writer.writelines(conn.data_to_send())
        await pump_until(lambda: any(isinstance(e, (StreamEnded, StreamReset)) for e in events))
        echoed = b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))
        assert not any(isinstance(e, StreamReset) for e in events)
        assert echoed == b"".join(pieces)
    finally:
        writer.close()
