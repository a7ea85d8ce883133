"""agent.relay.SpliceRelay on loopback TCP: exact bytes, half-close, concurrency, cancellation = reset."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from agent import relay as relay_module
from agent.relay import DEFAULT_PIPE_SIZE, SpliceRelay
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


async def test_a_client_reset_ends_the_relay_without_failing_it(relayer: Relayer) -> None:
    """ztunnel's copy ignores resets and broken pipes (src/copy.rs ignore_io_errors): a pod that resets its
    connection is no failed connection (no error in the log, flag "-"), though the relay keeps what happened."""
    sock = await connect_from("127.0.0.1", relayer.listener.address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()  # RST
    async with asyncio.timeout(5):
        result = await relayer.results.get()
    assert result.error is not None and result.ungraceful and result.failure is None, result


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_no_pipe_for_the_second_direction_leaks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (EMFILE) after the first direction got its pipe: the relay reports the error, closes both
    sockets and hands that pipe back, instead of raising with both sockets open and the pipe's two descriptors lost
    for good (nothing else knew them)."""
    monkeypatch.setattr(relay_module, "PIPES", relay_module._PipePool())  # no pooled pipes: each direction makes one
    real_pipe2 = os.pipe2
    made: list[int] = []

    def pipe2_then_emfile(flags: int) -> tuple[int, int]:
        if made:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        made.extend(real_pipe2(flags))
        return made[0], made[1]

    monkeypatch.setattr(relay_module.os, "pipe2", pipe2_then_emfile)
    client, client_peer = socket.socketpair()
    upstream, upstream_peer = socket.socketpair()
    try:
        before = _open_fds()
        result = await SpliceRelay(client, upstream).run()
        assert result.error is not None and "Too many open files" in result.error
        assert (result.bytes_up, result.bytes_down) == (0, 0)
        assert client.fileno() == -1 and upstream.fileno() == -1
        pipe = relay_module.PIPES.take(DEFAULT_PIPE_SIZE)  # the first direction's pipe went back to the pool
        assert list(pipe[:2]) == made
        os.close(pipe[0])
        os.close(pipe[1])
        assert _open_fds() <= before
    finally:
        for s in (client, client_peer, upstream, upstream_peer):
            s.close()
