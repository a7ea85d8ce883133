"""The agent's HTTP endpoints, on asyncio alone: admin (15000, localhost), metrics (15020), readiness (15021).

Three servers as in ztunnel, so that an expensive /config_dump never sits in the readiness probe's queue.
The HTTP/1.1 handling is deliberately minimal (one request per connection, bounded header size, no request
bodies beyond what is declared and small): these endpoints serve probes, scrapers and `ambitctl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent import rbac
from agent.addressing import BadAuthority, parse_authority
from agent.metrics import Metrics
from agent.state import WorkloadStore
from common.log import kv
from common.spiffe import Identity, InvalidIdentity

log = logging.getLogger("agent.admin")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, indent=2, default=str).encode() + b"\n", "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())


Route = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    pass


@dataclass
class HttpServer:
    """Routes `(method, path)` to handlers; one request per connection."""

    name: str
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
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
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                req = await _read_request(reader)
            resp = await self._dispatch(req)
        except (BadRequest, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError) as e:
            resp = Response.text(f"bad request: {e}\n", 400)
        except (TimeoutError, ConnectionError):
            writer.close()
            return
        head = (
            f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Error')}\r\n"
            f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + resp.body)
            await writer.drain()
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
        except Exception as e:
            log.exception("admin handler failed", extra=kv(server=self.name, path=req.path))
            return Response.text(f"internal error: {e}\n", 500)


async def _read_request(reader: asyncio.StreamReader) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise BadRequest("header too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length > MAX_BODY:
        raise BadRequest("body too large")
    if length:
        await reader.readexactly(length)
    url = urlsplit(parts[1])
    return Request(parts[0].upper(), url.path, parse_qs(url.query), headers)


def admin_server(
    dump: Callable[[], dict[str, Any]],
    certs: Callable[[], list[dict[str, Any]]],
    on_quit: Callable[[], None],
    store: WorkloadStore | None = None,
    trust_domain: str = "cluster.local",
) -> HttpServer:
    """15000: `/config_dump` (whatever `dump()` assembles), `/certs`, `/logging` (GET; POST `?level=` or
    `?<logger>=<level>`), `/quitquitquit` (POST), and with `store` `/explain?src=IP&dst=IP:PORT`
    (`&identity=spiffe://...` or `&plaintext=1`): the policy decision for such a connection, with the
    policies and the reason."""

    async def config_dump(_: Request) -> Response:
        return Response.json(dump())

    async def certificates(_: Request) -> Response:
        return Response.json(certs())

    async def get_logging(_: Request) -> Response:
        return Response.json(_levels())

    async def set_logging(req: Request) -> Response:
        if not req.query:
            return Response.text("usage: POST /logging?level=debug or ?<logger>=<level>\n", 400)
        for key, values in req.query.items():
            level = values[-1].upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                return Response.text(f"unknown level {values[-1]!r}\n", 400)
            logging.getLogger(None if key == "level" else key).setLevel(level)
        return Response.json(_levels())

    async def quitquitquit(_: Request) -> Response:
        asyncio.get_running_loop().call_soon(on_quit)
        return Response.text("OK\n")

    async def explain(req: Request) -> Response:
        q = {k: v[-1] for k, v in req.query.items()}
        try:
            src = str(ipaddress.ip_address(q["src"]))
            dst = parse_authority(q["dst"])
            ident = Identity.parse(q["identity"]) if q.get("identity") else None
        except KeyError as e:
            return Response.text(f"missing parameter {e}; usage: /explain?src=IP&dst=IP:PORT[&identity=URI]\n", 400)
        except (ValueError, BadAuthority, InvalidIdentity) as e:
            return Response.text(f"bad parameter: {e}\n", 400)
        plaintext = q.get("plaintext", "") in ("1", "true", "yes")
        assert store is not None  # the route is only registered with a store
        try:
            return Response.json(rbac.explain(store, trust_domain, src, dst, ident, plaintext=plaintext))
        except LookupError as e:
            return Response.text(f"{e}\n", 404)

    s = HttpServer("admin")
    if store is not None:
        s.routes[("GET", "/explain")] = explain
    s.routes.update(
        {
            ("GET", "/config_dump"): config_dump,
            ("GET", "/certs"): certificates,
            ("GET", "/logging"): get_logging,
            ("POST", "/logging"): set_logging,
            ("POST", "/quitquitquit"): quitquitquit,
        }
    )
    return s


def config_dump(
    store: WorkloadStore, certs: Any, *sections: tuple[str, Callable[[], Any]]
) -> Callable[[], dict[str, Any]]:
    """The /config_dump assembler: the store's snapshot (workloads, services, policies, camelCase as in
    ztunnel), `certificates`, and any named extra sections (e.g. ("connections", registry.snapshot))."""

    def dump() -> dict[str, Any]:
        out: dict[str, Any] = dict(store.snapshot_dict())
        out["certificates"] = certs.snapshot()
        for name, fn in sections:
            out[name] = fn()
        return out

    return dump


def _levels() -> dict[str, str]:
    out = {"level": logging.getLevelName(logging.getLogger().level).lower()}
    for name, lg in sorted(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET:
            out[name] = logging.getLevelName(lg.level).lower()
    return out


def metrics_server(metrics: Metrics) -> HttpServer:
    """15020: `/metrics` and `/stats/prometheus` (OpenMetrics when the scraper asks for it)."""

    async def scrape(req: Request) -> Response:
        body, content_type = metrics.render(req.headers.get("accept"))
        return Response(200, body, content_type)

    s = HttpServer("metrics")
    s.routes.update({("GET", "/metrics"): scrape, ("GET", "/stats/prometheus"): scrape})
    return s


def readiness_server(ready: Callable[[], tuple[bool, str]]) -> HttpServer:
    """15021: `/healthz/ready` is 200 only when `ready()` says so, else 503 with its reason."""

    async def healthz(_: Request) -> Response:
        ok, reason = ready()
        return Response.text(f"{reason or ('ready' if ok else 'not ready')}\n", 200 if ok else 503)

    s = HttpServer("readiness")
    s.routes[("GET", "/healthz/ready")] = healthz
    return s
