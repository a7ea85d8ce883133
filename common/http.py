"""A small HTTP/1.1 server on asyncio streams for the agent's and the controller's operator endpoints.

Probes, scrapers and `ambitctl` need a handful of routes, not a web framework, and the project adds no
dependency for that. What matters here is that a peer's malformed or oversized request gets a 400 and never
takes the process down, that a slow client cannot hold a connection forever (neither sending its request slowly
nor reading the answer slowly), that a server bound to loopback answers loopback alone, and that a failing handler
is a 500 rather than a dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common.log import kv

log = logging.getLogger("common.http")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    version: str = "HTTP/1.1"
    from_loopback: bool = False  # the peer is on this host's loopback (a local process, kubectl port-forward)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()  # further response headers (Content-Encoding, Vary)

    @classmethod
    def json(cls, obj: Any, status: int = 200, *, sort_keys: bool = False) -> Response:
        body = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str).encode() + b"\n"
        return cls(status, body, "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(ValueError):
    """The request cannot be parsed or exceeds a limit; answered with 400 and the connection closed."""


@dataclass
class HttpServer:
    """Routes `(method, path)` to handlers. A known path asked with another method is 405, an unknown path 404
    listing the endpoints. With `keep_alive`, an HTTP/1.1 client that does not send `Connection: close` may
    send further requests on the connection (scrapers reuse it); otherwise one request per connection. A
    response to HEAD carries no body."""

    name: str
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    keep_alive: bool = False
    read_timeout: float = 10.0
    # How long the client may take to read one answer. A scraper that sends its request and never reads held the
    # connection, and the whole rendered answer (a big /metrics or /config_dump), for as long as it liked.
    write_timeout: float = 10.0
    # At most this many connections at once; more are reset unanswered. Probes, scrapers and operators need a few,
    # and the metrics and readiness ports listen on every address: without a bound any pod of the node could hold
    # connections open (each up to read_timeout, again and again) until the agent ran out of descriptors, and then
    # every pod's captured connections failed with it (accept's EMFILE).
    max_connections: int = 128
    server: asyncio.Server | None = None
    connections: int = 0  # being served now
    _turning_away: bool = False  # logged once per spell over max_connections

    async def start(self, host: str, port: int) -> asyncio.Server:
        # A socket bound here rather than `start_server(host, port)`: uvloop resolves even a numeric host through
        # libuv's getaddrinfo thread pool, which starts four threads that then idle for the process's life.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # "::" is every address of both families, as for the data-path listeners (create_server makes an IPv6
        # socket IPv6-only unless asked).
        sock = socket.create_server((host, port), family=family, dualstack_ipv6=host == "::")
        self.server = await asyncio.start_server(self._serve, sock=sock)
        log.debug("http listening", extra=kv(server=self.name, address=host, port=self.port))
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if _forged_loopback(writer):
            _cut(writer)
            return
        if self.connections >= self.max_connections:
            if not self._turning_away:
                self._turning_away = True
                log.warning("http connections at their limit; turning new ones away", extra=kv(server=self.name))
            _cut(writer)
            return
        self._turning_away = False
        self.connections += 1
        peer = writer.get_extra_info("peername")
        from_loopback = bool(peer) and _is_loopback(str(peer[0]))
        try:
            first = True
            while True:
                try:
                    async with asyncio.timeout(self.read_timeout):
                        req = await read_request(reader, from_loopback)
                except asyncio.IncompleteReadError as e:
                    if not first and not e.partial:
                        return  # the client closed an idle persistent connection
                    await _write(writer, Response.text(f"bad request: {e}\n", 400), keep=False)
                    return
                except (BadRequest, asyncio.LimitOverrunError, ValueError) as e:
                    await _write(writer, Response.text(f"bad request: {e}\n", 400), keep=False)
                    return
                except (TimeoutError, ConnectionError):
                    return
                first = False
                keep = (
                    self.keep_alive
                    and req.version == "HTTP/1.1"
                    and req.headers.get("connection", "").lower() != "close"
                )
                resp = await self._dispatch(req)
                try:
                    async with asyncio.timeout(self.write_timeout):
                        await _write(writer, resp, keep=keep, head_only=req.method == "HEAD")
                except TimeoutError:
                    log.info("http client too slow to read its answer", extra=kv(server=self.name, path=req.path))
                    _cut(writer)
                    return
                if not keep:
                    return
        except ConnectionError:
            return
        finally:
            self.connections -= 1
            writer.close()

    async def _dispatch(self, req: Request) -> Response:
        handler = self.routes.get((req.method, req.path))
        if handler is None:
            if any(path == req.path for _, path in self.routes):
                return Response.text(f"method {req.method} not allowed on {req.path}\n", 405)
            known = "\n".join(sorted({p for _, p in self.routes}))
            return Response.text(f"{req.path} not found; endpoints:\n{known}\n", 404)
        try:
            return await handler(req)
        except Exception as e:  # an operator endpoint must never take the process down
            log.exception("http handler failed", extra=kv(server=self.name, path=req.path))
            return Response.text(f"internal error: {type(e).__name__}: {e}\n", 500)


def _cut(writer: asyncio.StreamWriter) -> None:
    """Close with RST: close() would wait, holding the answer, for the client to read it, and a plain close of the
    socket leaves what the kernel buffered to be sent (an orphan keeps sending it, FIN last)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _forged_loopback(writer: asyncio.StreamWriter) -> bool:
    """A connection to a loopback address from a peer that is not on loopback. The kernel drops such packets as
    martians unless the node sets net.ipv4.conf.*.route_localnet=1 (kube-proxy's iptables mode does, for NodePorts
    on localhost), and then a pod with CAP_NET_RAW can reach the node's loopback (CVE-2020-8558), where the agent's
    admin port answers: it only ever arrives forged, since a process of the node connects from loopback. Logged,
    not answered."""
    local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    if not local or not peer or not _is_loopback(str(local[0])) or _is_loopback(str(peer[0])):
        return False
    log.warning("http connection to loopback from elsewhere refused", extra=kv(local=local[0], peer=peer[0]))
    return True


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:  # on a dual-stack socket
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


async def _write(writer: asyncio.StreamWriter, resp: Response, *, keep: bool, head_only: bool = False) -> None:
    head = (
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Error')}\r\n"
        f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in resp.headers)
        + f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError):
        writer.write(head.encode() if head_only else head.encode() + resp.body)
        await writer.drain()


async def read_request(reader: asyncio.StreamReader, from_loopback: bool = False) -> Request:
    """One request head and its (discarded, bounded) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise BadRequest("header too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"malformed header line {line[:80]!r}")
            # Repeated field lines are one comma-separated list (RFC 9110 5.3): two Accept lines negotiate together.
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    length = int(headers.get("content-length", "0"))
    if length > MAX_BODY:
        raise BadRequest("body too large")
    if length:
        await reader.readexactly(length)
    url = urlsplit(parts[1])
    # Blank values kept: `istioctl ztunnel-config log --reset` sends a bare `reset`.
    query = parse_qs(url.query, keep_blank_values=True)
    return Request(parts[0].upper(), url.path, query, headers, parts[2], from_loopback)
