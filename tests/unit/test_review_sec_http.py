"""Security review: the operator HTTP servers (common/http.py) against a client that never reads its answer.

The agent's metrics port (15020) listens on every address, so any pod can reach it. A client that sends
`GET /metrics` and then never reads kept the connection, its handler and the whole rendered answer in memory for as
long as it liked (the read timeout covered the request only): a handful of such clients per scrape-sized answer
(megabytes with many series) held that much memory each, with no end. Now the answer must be read within
`write_timeout`, or the connection is cut. Fails before the fix: the server never gave up on the client.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from common.http import HttpServer, Request, Response
from tests.support.waiting import eventually

BODY = b"x" * (16 * 1024 * 1024)  # far more than the socket buffers of both ends take


async def _big(_: Request) -> Response:
    return Response(200, BODY)


async def _reset_by_server(sock: socket.socket, bound: float = 10.0) -> bool:
    """Whether the server cuts the connection (RST) within `bound` seconds, a liveness bound, not a measurement.
    Nothing is read: the unread answer stays in the client's buffer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while loop.time() < deadline:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_client_that_never_reads_its_answer_is_cut_off() -> None:
    server = HttpServer("metrics", write_timeout=0.3)
    server.routes[("GET", "/metrics")] = _big
    await server.start("127.0.0.1", 0)
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", server.port))
        client.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await _reset_by_server(client), "the server held the answer for a client that does not read"
        await asyncio.sleep(0)  # the handler's finally has run once the reset is out
        assert server.connections == 0
    finally:
        client.close()
        await server.close()


async def test_a_client_that_reads_gets_the_whole_answer() -> None:
    """The control: the timeout is for one answer's delivery stalling, and a reading client is served whole."""
    server = HttpServer("metrics", write_timeout=5.0)
    server.routes[("GET", "/metrics")] = _big
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1 << 20)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(BODY)}".encode() in head
        assert await reader.readexactly(len(BODY)) == BODY
        writer.close()
    finally:
        await server.close()


async def test_connections_beyond_the_limit_are_turned_away_and_the_held_ones_served() -> None:
    """The metrics and readiness ports listen on every address: a pod holding connections open (a request never
    finished, up to read_timeout each, again and again) held one descriptor each without bound, until the agent ran
    out (the data path's accept then fails for every pod: EMFILE). Fails before: the connection over the limit was
    held like the others."""
    server = HttpServer("metrics", read_timeout=60.0, max_connections=2)
    server.routes[("GET", "/metrics")] = _big
    await server.start("127.0.0.1", 0)
    held = []
    try:
        for _ in range(2):  # a request never finished: each is held, up to read_timeout
            held.append(await asyncio.open_connection("127.0.0.1", server.port))
            held[-1][1].write(b"GET /metrics HTTP/1.1\r\n")
        await eventually(lambda: server.connections == 2, "both connections being served")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            async with asyncio.timeout(10):  # a liveness bound: before the fix, only read_timeout (60 s) ended it
                assert await reader.read() == b""
        except ConnectionResetError:
            pass
        writer.close()
        # The held ones are still served once they finish their request.
        r, w = held[0]
        w.write(b"Host: x\r\n\r\n")
        assert (await r.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        for _, w in held:
            w.close()
        await server.close()
