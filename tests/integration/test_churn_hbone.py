"""HBONE server under stream churn: CONNECTs that their clients reset before the answer (clients giving up, or an
HTTP/2 rapid-reset flood from a peer holding a mesh certificate), on 127.0.0.1 with the real tunnel code."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator

import pytest

from agent.hbone import PING, PREFACE, SETTINGS
from agent.tunnel import ConnectRequest, TunnelStats, connect
from tests.support.hbone_testbed import HboneServer
from tests.support.loops import BOTH_LOOPS, event_loop_policy
from tests.support.pki import TestCA

pytestmark = BOTH_LOOPS
__all__ = ["event_loop_policy"]

RESETS = 1000
PROBE = "127.0.0.1:10"


class SlowUpstream:
    """A handler whose upstream never answers (a pod that is slow to accept): it runs until cancelled."""

    def __init__(self) -> None:
        self.running = 0
        self.probed = asyncio.Event()

    async def __call__(self, req: ConnectRequest) -> None:
        self.running += 1
        if req.authority == PROBE:
            self.probed.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.running -= 1


@pytest.fixture
async def setup() -> AsyncIterator[tuple[TestCA, HboneServer, SlowUpstream]]:
    ca = TestCA()
    handler = SlowUpstream()
    server_ctx = ca.server_context(ca.issue(ca.identity("default", "server")))
    server = await HboneServer(server_ctx, handler=handler).start()
    try:
        yield ca, server, handler
    finally:
        await server.close()


async def test_connects_reset_before_the_answer_leave_no_handler_running(
    setup: tuple[TestCA, HboneServer, SlowUpstream],
) -> None:
    """max_concurrent_streams (200) bounds open streams, and a reset stream is no longer open: without cancelling
    their handlers a client could keep any number of them at work (each connecting to the pod) on one connection."""
    ca, server, handler = setup
    server_id = ca.identity("default", "server")
    client_ctx = ca.client_context(ca.issue(ca.identity("default", "client")))
    conn = await connect(server.addr, client_ctx, server_id, stats=TunnelStats())
    proto = conn._proto  # the sans-IO core: a CONNECT and its RST_STREAM in one write, as a flood sends them
    try:
        for i in range(RESETS):
            sid = proto.h2.send_connect("127.0.0.1:9", [])
            proto.h2.reset_stream(sid)
            proto.flush()
            if i % 100 == 99:
                await asyncio.sleep(0.01)  # let the server read; the flood stays far above 200 streams
        # A last CONNECT, not reset: once its handler runs, the server has read (and started handlers for) all the
        # ones before it, in order on the one connection.
        probe = asyncio.ensure_future(conn.open_stream(PROBE, []))
        async with asyncio.timeout(30):  # liveness bound
            await handler.probed.wait()
        assert conn.usable
        assert handler.running == 1, f"{handler.running - 1} handlers of reset CONNECTs still running"
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
    finally:
        conn.close()


def _frame(ftype: int, payload: bytes) -> bytes:
    return struct.pack(">BHBBL", 0, len(payload), ftype, 0, 0) + payload


def _ping_flood(addr: tuple[str, int], ctx: ssl.SSLContext, pings: int) -> int:
    """A TLS client that sends SETTINGS then PINGs and never reads; returns how many PINGs went out before the
    server cut the connection (``pings`` if it never did)."""
    raw = socket.create_connection(addr, timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with ctx.wrap_socket(raw) as tls:
        tls.sendall(PREFACE + _frame(SETTINGS, b""))
        batch = _frame(PING, b"flood!!!") * 1000
        sent = 0
        try:
            while sent < pings:
                tls.sendall(batch)
                sent += 1000
        except OSError:  # reset, EOF or (timeout) a server that stopped reading
            pass
        return sent


async def test_a_peer_that_sends_pings_and_reads_nothing_is_cut(
    setup: tuple[TestCA, HboneServer, SlowUpstream],
) -> None:
    """Every PING is answered; a peer that reads none of the answers made the server buffer them all (2 million
    PINGs: 30 MB, growing for as long as it kept sending). A well-behaved peer sends one per keepalive interval."""
    ca, server, _ = setup
    client_ctx = ca.client_context(ca.issue(ca.identity("default", "client")))
    pings = 2_000_000
    sent = await asyncio.to_thread(_ping_flood, server.addr, client_ctx, pings)
    assert sent < pings, "the server kept answering a peer that reads nothing"
    assert server.stats.errors["flood"] == 1
