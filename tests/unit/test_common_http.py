"""The shared operator HTTP server (common/http.py): persistence, HEAD, limits and routing errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common.http import MAX_BODY, HttpServer, Request, Response, read_request


async def _hello(req: Request) -> Response:
    return Response.json({"path": req.path, "q": req.query})


async def _broken(_: Request) -> Response:
    raise KeyError("gone")


def _server(keep_alive: bool) -> HttpServer:
    s = HttpServer("test", keep_alive=keep_alive)
    s.routes.update({("GET", "/hello"): _hello, ("HEAD", "/hello"): _hello, ("GET", "/broken"): _broken})
    return s


@pytest.fixture(params=[False, True], ids=["close", "keep-alive"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[HttpServer]:
    s = _server(request.param)
    await s.start("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(head[0].split()[1]), headers, body


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_persistent_connection_only_when_enabled(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /hello?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await _read_response(reader)
    assert status == 200 and b'"a"' in body
    if server.keep_alive:
        assert headers["connection"] == "keep-alive"
        writer.write(b"GET /broken HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = await _read_response(reader)
        assert status == 500 and b"KeyError" in body and headers["connection"] == "close"
    else:
        assert headers["connection"] == "close"
    assert await reader.read() == b""
    writer.close()


async def test_head_has_no_body_and_routing_errors(server: HttpServer) -> None:
    raw = await _exchange(server.port, b"HEAD /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Type: application/json" in head and body == b""
    raw = await _exchange(server.port, b"POST /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 405")
    raw = await _exchange(server.port, b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404") and b"/broken\n/hello\n" in raw


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01 garbage\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nno-colon\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nContent-Length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nContent-Length: nan\r\n\r\n",
    ],
    ids=["garbage", "header-line", "body-limit", "head-limit", "bad-length"],
)
async def test_bad_requests_are_400_and_close(server: HttpServer, raw: bytes) -> None:
    reply = await _exchange(server.port, raw)
    assert reply.startswith(b"HTTP/1.1 400") and b"Connection: close" in reply
    assert (await _exchange(server.port, b"GET /hello HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 200")


async def test_every_address_means_both_families() -> None:
    """The agent's probe and metrics servers bind "::" when the data path is IPv6: the kubelet or Prometheus may
    come over either family."""
    s = _server(False)
    await s.start("::", 0)
    try:
        for host in ("::1", "127.0.0.1"):
            reader, writer = await asyncio.open_connection(host, s.port)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            status, _, _ = await _read_response(reader)
            writer.close()
            assert status == 200, host
    finally:
        await s.close()


async def _parse(raw: bytes) -> Request:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_request(reader)


async def test_bare_query_keys_and_repeated_header_lines_are_kept() -> None:
    """istioctl's `ztunnel-config log --reset` sends a bare ``reset`` (it was dropped as blank), and a client may split
    a list field such as Accept over two lines (RFC 9110 5.3: one comma-separated list; the last line alone won)."""
    req = await _parse(
        b"POST /logging?reset&level=info HTTP/1.1\r\nAccept: text/plain\r\n"
        b"Accept: application/openmetrics-text;version=1.0.0\r\n\r\n"
    )
    assert req.query == {"reset": [""], "level": ["info"]}
    assert req.headers["accept"] == "text/plain, application/openmetrics-text;version=1.0.0"
