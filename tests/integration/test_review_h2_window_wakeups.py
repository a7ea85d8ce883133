"""A flood of tiny connection WINDOW_UPDATEs against relays blocked on the connection window, through the real
TLS server: each WindowOpened(0) wakes every blocked relay, so they must be handled once per read, not per frame."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator

import pytest
from hpack import Encoder

from agent import hbone, tunnel
from tests.support.hbone_testbed import HboneServer
from tests.support.loops import BOTH_LOOPS, event_loop_policy
from tests.support.pki import TestCA
from tests.support.waiting import eventually

pytestmark = BOTH_LOOPS
__all__ = ["event_loop_policy"]

STREAMS = 50
UPDATES = 2000
HDR = struct.Struct(">BHBBL")


def _frame(ftype: int, sid: int, payload: bytes) -> bytes:
    return HDR.pack(0, len(payload), ftype, 0, sid) + payload


class _Client:
    """Raw TLS HTTP/2 client: opens STREAMS tunnels, never returns connection credit, counts DATA bytes."""

    def __init__(self, addr: tuple[str, int], ctx: ssl.SSLContext, authority: str) -> None:
        self.tls = ctx.wrap_socket(socket.create_connection(addr, timeout=30))
        enc = Encoder()
        out = hbone.PREFACE + _frame(hbone.SETTINGS, 0, struct.pack(">HL", hbone.S_INITIAL_WINDOW_SIZE, 2**31 - 1))
        for i in range(STREAMS):
            block = enc.encode([(":method", "CONNECT"), (":authority", authority)])
            out += HDR.pack(0, len(block), hbone.HEADERS, hbone.FLAG_END_HEADERS, 2 * i + 1) + block
        self.tls.sendall(out)
        self.data = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.tls.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 9:
                hi, lo, ftype, _flags, _sid = HDR.unpack_from(buf)
                n = (hi << 16) | lo
                if len(buf) < 9 + n:
                    break
                if ftype == hbone.DATA:
                    self.data += n
                buf = buf[9 + n :]


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A pod that sends without end."""
    chunk = b"y" * 65536
    try:
        while True:
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


@pytest.fixture
async def setup() -> AsyncIterator[tuple[TestCA, HboneServer, str]]:
    ca = TestCA()
    pod = await asyncio.start_server(_source, "127.0.0.1", 0)
    server = await HboneServer(ca.server_context(ca.issue(ca.identity("default", "server")))).start()
    try:
        yield ca, server, f"127.0.0.1:{pod.sockets[0].getsockname()[1]}"
    finally:
        await server.close()
        pod.close()


async def test_tiny_connection_window_updates_wake_blocked_relays_once_per_read(
    setup: tuple[TestCA, HboneServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, server, authority = setup
    wakeups = 0
    on_writable = tunnel.HboneStream._on_writable

    def counting(self: tunnel.HboneStream) -> None:
        nonlocal wakeups
        wakeups += 1
        on_writable(self)

    monkeypatch.setattr(tunnel.HboneStream, "_on_writable", counting)
    ctx = ca.client_context(ca.issue(ca.identity("default", "client")))
    client = await asyncio.to_thread(_Client, server.addr, ctx, authority)
    try:
        await eventually(lambda: client.data >= hbone.DEFAULT_WINDOW, "the connection window spent")
        await eventually(lambda: len(server.requests) == STREAMS, "every relay running, blocked on it")
        await asyncio.sleep(0.2)
        wakeups = 0
        flood = _frame(hbone.WINDOW_UPDATE, 0, struct.pack(">L", 1)) * UPDATES
        await asyncio.to_thread(client.tls.sendall, flood)
        await eventually(lambda: client.data >= hbone.DEFAULT_WINDOW + UPDATES, "every byte of credit used")
        # per frame, each of the 50 blocked relays was woken: 100,000 wake-ups; per read, a few hundred
        assert wakeups < UPDATES, f"{wakeups} wake-ups for {UPDATES} WINDOW_UPDATEs"
    finally:
        client.tls.close()
