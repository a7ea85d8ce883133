"""Reviewer O: outbound connect timing compared with ztunnel's (src/proxy.rs freebind_connect, used by
src/proxy/outbound.rs proxy_to_tcp), on the loopback two-node mesh (tests/integration/proxy_mesh.py) wired with the
agent's defaults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.integration.proxy_mesh import Mesh
from tests.integration.test_review_o_inbound import jammed_listener
from tests.support.proxy_echo import connect_from

SLOW_PORT = 8098


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


async def test_a_destination_answering_the_third_syn_retransmission_is_reached(mesh: Mesh) -> None:
    """A server outside the mesh whose first SYNs are lost (a lossy path, a full accept queue for a moment)
    answers the kernel's third retransmission, 7 s after the first SYN. ztunnel gives a passthrough connect
    10 s (CONNECTION_TIMEOUT), as its inbound ones; the agent gave up after 5 s and reset a connection the client
    would have had without the mesh and with ztunnel."""
    loop = asyncio.get_running_loop()
    with jammed_listener(mesh.ip["legacy"], SLOW_PORT) as jammed:
        client = await connect_from(mesh.ip["client"], mesh.n1.capture_outbound((mesh.ip["legacy"], SLOW_PORT)))
        try:
            await asyncio.sleep(5.5)  # SYNs go out at 0, 1, 3 and 7 s: room in the queue before the fourth
            jammed.release()
            server, _ = await asyncio.wait_for(loop.sock_accept(jammed.sock), 30)  # a liveness bound
            with server:
                await loop.sock_sendall(client, b"ping")
                assert await loop.sock_recv(server, 4) == b"ping"
                await loop.sock_sendall(server, b"pong")
                assert await loop.sock_recv(client, 4) == b"pong"
        finally:
            client.close()
