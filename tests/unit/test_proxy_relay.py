"""agent.relay.SpliceRelay on loopback TCP: exact bytes, half-close, concurrency, cancellation = reset."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from agent.relay import SpliceRelay
from agent.sockets import Listener, connect_upstream, transparent_listener
from agent.tunnel import RelayResult
from tests.support.proxy_echo import connect_from, echo_server, exchange_socket


class Relayer:
    """A listener that splices each accepted connection to the echo server and keeps the results."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.results: asyncio.Queue[RelayResult] = asyncio.Queue()
        self.relays: list[SpliceRelay] = []
        self.listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), self.handle, "test")

    async def handle(self, sock: socket.socket, orig_dst: tuple[str, int]) -> None:
        up = await connect_upstream(self.upstream)
        relay = SpliceRelay(sock, up, pipe_size=1 << 16)
        self.relays.append(relay)
        self.results.put_nowait(await relay.run())


@pytest.fixture
async def relayer() -> AsyncIterator[Relayer]:
    server = await echo_server("127.0.0.1")
    r = Relayer(server.sockets[0].getsockname()[:2])
    r.listener.start()
    try:
        yield r
    finally:
        await r.listener.close()
        server.close()


async def test_large_transfer_is_exact(relayer: Relayer) -> None:
    sock = await connect_from("127.0.0.1", relayer.listener.address)
    ex = await exchange_socket(sock, 8 * 1024 * 1024 + 13)
    assert ex.intact
    assert await relayer.results.get() == RelayResult(ex.sent, ex.received, None)


async def test_many_concurrent(relayer: Relayer) -> None:
    async def one(i: int) -> bool:
        sock = await connect_from("127.0.0.1", relayer.listener.address)
        return (await exchange_socket(sock, 100_000 + i * 1777)).intact

    assert all(await asyncio.gather(*(one(i) for i in range(40))))
    results = [await relayer.results.get() for _ in range(40)]
    assert sum(r.bytes_up for r in results) == sum(100_000 + i * 1777 for i in range(40))
    assert all(r.bytes_up == r.bytes_down and r.error is None for r in results)


async def test_half_close_keeps_return_direction(relayer: Relayer) -> None:
    reader, writer = await asyncio.open_connection(*relayer.listener.address)
    writer.write(b"hello")
    writer.write_eof()  # our FIN must reach the echo server only after "hello"
    assert await reader.read() == b"hello"  # and its answer still comes back, then EOF
    writer.close()


async def test_cancel_resets_both_sides(relayer: Relayer) -> None:
    reader, writer = await asyncio.open_connection(*relayer.listener.address)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    for t in relayer.listener.tasks:
        t.cancel()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(5):
            while await reader.read(100):
                pass
            raise AssertionError("expected a reset, got a clean EOF")
    assert relayer.relays[0].bytes_up == 4 and relayer.relays[0].bytes_down == 4
    writer.close()
