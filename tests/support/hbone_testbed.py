"""Loopback HBONE test peers: an echo/sink backend and an Ambit HBONE server (serve_hbone_connection) with a
configurable answer, for tunnel, pool and Envoy interop tests. Everything binds 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent.pool import HboneConnectionPool
from agent.tunnel import ConnectRequest, HboneStream, TunnelConfig, TunnelStats, serve_hbone_connection
from bench.hbone_micro import forward_to_authority
from lab.workload import handle_echo
from tests.support.pki import TestCA


class Backend:
    """A TCP server on 127.0.0.1: ``echo`` echoes and half-closes after the client's FIN; ``stall`` accepts and
    never reads."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        self._held: list[asyncio.StreamWriter] = []

    async def start(self, port: int = 0) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "stall":
            self._held.append(writer)
            return
        await handle_echo(reader, writer)

    async def close(self) -> None:
        for w in self._held:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


Handler = Callable[[ConnectRequest], Awaitable[None]]


class HboneServer:
    """Ambit's HBONE server side (on 127.0.0.1 unless ``bind`` says otherwise): accepts, runs
    serve_hbone_connection, and by default answers 200 and relays to the ``:authority`` (or answers ``status``)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        trust_domain: str = "cluster.local",
        status: int = 200,
        config: TunnelConfig | None = None,
        handler: Handler | None = None,
        bind: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.ssl_context = ssl_context
        self.bind = bind
        self.trust_domain = trust_domain
        self.status = status
        self.config = config or TunnelConfig()
        self.stats = TunnelStats()
        self.requests: list[ConnectRequest] = []
        self.connections = 0
        self.handler = handler or self._default_handler
        self._lsock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> HboneServer:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(self.bind)
        lsock.listen(128)
        lsock.setblocking(False)
        self._lsock = lsock
        self.port = lsock.getsockname()[1]
        self._spawn(self._accept())
        return self

    @property
    def addr(self) -> tuple[str, int]:
        return (self.bind[0], self.port)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        assert self._lsock is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._lsock)
            sock.setblocking(False)
            self.connections += 1
            self._spawn(
                serve_hbone_connection(
                    sock,
                    self.ssl_context,
                    self._record,
                    trust_domain=self.trust_domain,
                    config=self.config,
                    stats=self.stats,
                )
            )

    async def _record(self, req: ConnectRequest) -> None:
        self.requests.append(req)
        await self.handler(req)

    async def _default_handler(self, req: ConnectRequest) -> None:
        if self.status != 200:
            await req.respond(self.status)
            return
        await forward_to_authority(req)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._lsock is not None:
            self._lsock.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def echo() -> AsyncIterator[Backend]:
    """An echo Backend for one test (import the fixture into the test module)."""
    b = await Backend().start()
    yield b
    await b.close()


@pytest.fixture
async def hbone_server() -> AsyncIterator[tuple[HboneServer, TestCA]]:
    """An HBONE server with the identity default/server of its own CA, for one test (tests/conftest.py loads it)."""
    ca = TestCA()
    s = await HboneServer(ca.server_context(ca.issue(ca.identity("default", "server")))).start()
    yield s, ca
    await s.close()


@pytest.fixture
async def pool() -> AsyncIterator[HboneConnectionPool]:
    """A client pool with its own counters, closed after the test."""
    p = HboneConnectionPool(stats=TunnelStats())
    yield p
    await p.close()


async def roundtrip(stream: HboneStream, payload: bytes = b"hello") -> bytes:
    """Write `payload`, half-close, and read until the peer's END_STREAM: what an echo backend sent back."""
    await stream.write(payload)
    stream.write_eof()
    out = b""
    while chunk := await stream.read():
        out += chunk
    return out
