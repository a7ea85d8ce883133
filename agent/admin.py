"""The agent's HTTP endpoints, on asyncio alone: admin (15000, localhost), metrics (15020), readiness (15021).

Three servers as in ztunnel, so that an expensive /config_dump never sits in the readiness probe's queue.
The HTTP/1.1 handling (common/http.py) is deliberately minimal: one request per connection, bounded header
size, no request bodies beyond what is declared and small; these endpoints serve probes, scrapers and `ambitctl`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent import rbac
from agent.addressing import BadAuthority, parse_authority
from agent.metrics import Metrics
from agent.prometheus import gzip_accepted
from agent.state import WorkloadStore
from common.http import HttpServer, Request, Response
from common.spiffe import Identity, InvalidIdentity


def admin_server(
    dump: Callable[[], dict[str, Any]],
    certs: Callable[[], Sequence[Mapping[str, object]]],
    on_quit: Callable[[], None],
    store: WorkloadStore | None = None,
    trust_domain: str = "cluster.local",
) -> HttpServer:
    """15000: `/config_dump` (whatever `dump()` assembles), `/certs` (the list its `certificates` holds),
    `/logging` (GET; POST `?level=` or `?<logger>=<level>`), `/quitquitquit` (POST), and with `store`
    `/explain?src=IP&dst=IP:PORT` (`&identity=spiffe://...` or `&plaintext=1`): the policy decision for such a
    connection, with the policies and the reason."""

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
    ztunnel), `certificates` (ztunnel's shape, which `istioctl ztunnel-config certificates` reads: see
    agent.identity.CertsDump), and any named extra sections (e.g. ("connections", registry.snapshot))."""

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
    """15020: `/metrics` and `/stats/prometheus` (OpenMetrics when the scraper asks for it, gzip when it takes it)."""

    async def scrape(req: Request) -> Response:
        gzip = gzip_accepted(req.headers.get("accept-encoding", ""))
        body, content_type = await metrics.render(req.headers.get("accept"), gzip=gzip)
        encoding = (("Content-Encoding", "gzip"),) if gzip else ()
        return Response(200, body, content_type, (*encoding, ("Vary", "Accept-Encoding")))

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
