"""The sample workload's servers on 127.0.0.1: the HTTP answer names the pod and its caller; echo returns every
byte and half-closes."""

from __future__ import annotations

import asyncio
import json

from lab.workload import HttpHandler, WorkloadConfig, handle_echo

CFG = WorkloadConfig(name="server-1", namespace="demo", node="node2")


async def _server(handler: object) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


async def _read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_http_names_pod_and_caller_over_keep_alive() -> None:
    server, port = await _server(HttpHandler(CFG))
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        local = writer.get_extra_info("sockname")
        for path in ("/a", "/b"):  # two requests on one connection
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = await _read_response(reader)
            assert status == "HTTP/1.1 200 OK" and headers["connection"] == "keep-alive"
            assert json.loads(body) == {
                "pod": "server-1",
                "namespace": "demo",
                "node": "node2",
                "client": f"{local[0]}:{local[1]}",
                "server": f"127.0.0.1:{port}",
                "path": path,
            }
        writer.write(b"POST /c HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        status, headers, body = await _read_response(reader)
        assert headers["connection"] == "close" and json.loads(body)["path"] == "/c"
        assert await reader.read() == b""
        writer.close()


async def test_http_rejects_a_malformed_request_line() -> None:
    server, port = await _server(HttpHandler(CFG))
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NONSENSE\r\n\r\n")
        status, _, body = await _read_response(reader)
        assert status == "HTTP/1.1 400 Bad Request" and b"bad request line" in body
        assert await reader.read() == b""
        writer.close()


async def test_echo_returns_everything_then_half_closes() -> None:
    server, port = await _server(handle_echo)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        writer.write_eof()
        assert await reader.read() == payload
        writer.close()
