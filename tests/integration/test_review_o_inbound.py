"""Reviewer O: inbound cases compared with ztunnel's (src/proxy/inbound.rs serve_connect, src/proxy.rs
freebind_connect), on the loopback two-node mesh (tests/integration/proxy_mesh.py) wired with the agent's defaults."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.integration.proxy_mesh import Mesh
from tests.support.proxy_echo import connect_from

JAMMED_PORT = 8099


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


class Jammed:
    """A listener that drops every further SYN: its accept queue (backlog 0) is full and nobody accepts. A pod that
    never answers the SYN looks the same to the agent (a NetworkPolicy dropping it, an overloaded pod)."""

    def __init__(self, ip: str, port: int) -> None:
        self.sock = socket.socket()
        self.fillers: list[socket.socket] = []
        self.sock.bind((ip, port))
        self.sock.listen(0)
        for _ in range(2):  # one fills the queue, the other keeps retrying its SYN
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((ip, port))
            self.fillers.append(s)

    def release(self) -> None:
        """Room for one more connection: the fillers go, the queued one is taken off the queue."""
        for s in self.fillers:
            s.close()
        self.fillers.clear()
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            self.sock.accept()[0].close()

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


@contextlib.contextmanager
def jammed_listener(ip: str, port: int) -> Iterator[Jammed]:
    jammed = Jammed(ip, port)
    try:
        yield jammed
    finally:
        jammed.close()


async def _until_closed(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 30)  # a liveness bound, not a measurement
    finally:
        writer.close()


async def test_a_pod_that_never_answers_the_syn_is_the_destinations_503_at_the_source(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination agent gives up on the pod's connect and answers 503 (ztunnel: ConnectionFailed, 503), which
    the source records as the peer's answer. With the defaults as they were, the source stopped waiting for the
    CONNECT's answer (5 s) at the very moment the destination's connect timeout (5 s) was due, always first (its
    timer started a round trip earlier): the source logged a stream timeout (H2_HANDSHAKE_FAILURE) and the
    destination's 503, with its reason, went to a reset stream. Now the source waits 15 s, the destination's
    connect gives up after ztunnel's 10 s."""
    with jammed_listener(mesh.ip["echo-1"], JAMMED_PORT), caplog.at_level(logging.INFO):
        client = await connect_from(mesh.ip["client"], mesh.n1.capture_outbound((mesh.ip["echo-1"], JAMMED_PORT)))
        await _until_closed(client)
        await mesh.settled()
    source = [r.fields for r in caplog.records if r.name == "access.n1"]  # type: ignore[attr-defined]
    destination = [r.fields for r in caplog.records if r.name == "access.n2"]  # type: ignore[attr-defined]
    assert len(destination) == 1 and "timed out" in destination[0]["error"]
    assert len(source) == 1
    assert source[0]["error"] == "HBONE CONNECT failed: 503 peer answered 503"
    assert source[0]["response_flags"] == "CONNECT"
