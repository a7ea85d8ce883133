"""Security review: the data-path Listener's bound on one client's connections (agent/sockets.py).

Measured in a lab (examples/basic, the agent's descriptor limit 20000): demo/client opened 4402 idle connections
through 15001 to a server outside the mesh; each took about 4.5 of the agent's descriptors (two sockets, the splice
relay's pipes), the agent ran out (accept: EMFILE, 777 'accept failed' lines), and demo/server-2's new connections
timed out until the flood ended. ztunnel has no per-pod bound either. `max_per_client` lets the agent bound one
address's share (off by default: main.py decides, see the review's report); over it, a connection is reset at accept
and reported as refused, and the others, that client's earlier ones and other clients', are served.
"""

from __future__ import annotations

import asyncio
import socket

from agent.sockets import Address, Listener, transparent_listener
from tests.support.waiting import eventually


async def _turned_away(port: int) -> None:
    """A connection reset at once (on loopback the reset may land before connect returns)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:
        return
    try:
        async with asyncio.timeout(10):  # a liveness bound, not a measurement
            assert await reader.read() == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()


async def test_a_client_over_its_limit_is_turned_away_and_the_others_served() -> None:
    release = asyncio.Event()
    handled: list[Address] = []
    refused: list[tuple[Address, Address, str]] = []

    async def hold(sock: socket.socket, dst: Address) -> None:
        handled.append(dst)
        await release.wait()
        sock.close()

    listener = Listener(
        transparent_listener(0, "127.0.0.1", transparent=False),
        hold,
        "outbound",
        max_per_client=2,
        refused=lambda client, dst, reason: refused.append((client, dst, reason)),
    )
    listener.start()
    port = listener.address[1]
    opened = []
    try:
        for _ in range(2):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        await eventually(lambda: len(handled) == 2, "both connections handled")
        await _turned_away(port)  # the third of the same address
        assert len(handled) == 2
        assert [(c[0], d, r) for c, d, r in refused] == [("127.0.0.1", ("127.0.0.1", port), "client_connection_limit")]
        # Another address is no concern of this client's limit.
        opened.append(await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)))
        await eventually(lambda: len(handled) == 3, "another client's connection handled")
        # Once the held ones end, the client's count goes down with them and it is served again.
        release.set()
        await eventually(lambda: not listener.per_client, "the counts released")
        release.clear()
        opened.append(await asyncio.open_connection("127.0.0.1", port))
        await eventually(lambda: len(handled) == 4, "the client served again")
    finally:
        release.set()
        for _, w in opened:
            w.close()
        await listener.close()


async def test_no_limit_by_default() -> None:
    handled: list[Address] = []
    release = asyncio.Event()

    async def hold(sock: socket.socket, dst: Address) -> None:
        handled.append(dst)
        await release.wait()
        sock.close()

    listener = Listener(transparent_listener(0, "127.0.0.1", transparent=False), hold, "outbound")
    listener.start()
    opened = []
    try:
        for _ in range(20):
            opened.append(await asyncio.open_connection("127.0.0.1", listener.address[1]))
        await eventually(lambda: len(handled) == 20, "every connection handled")
        assert listener.per_client == {}
    finally:
        release.set()
        for _, w in opened:
            w.close()
        await listener.close()
