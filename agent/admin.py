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
from agent.config_dump import ztunnel_dump
from agent.metrics import Metrics
from agent.prometheus import gzip_accepted
from agent.state import WorkloadStore
from common.http import HttpServer, Request, Response
from common.log import LogLevelError, parse_levels
from common.spiffe import Identity, InvalidIdentity


def admin_server(
    dump: Callable[[], dict[str, Any]],
    certs: Callable[[], Sequence[Mapping[str, object]]],
    on_quit: Callable[[], None],
    store: WorkloadStore | None = None,
    trust_domain: str = "cluster.local",
) -> HttpServer:
    """15000: `/config_dump` (whatever `dump()` assembles; the agent's :class:`ConfigDump` is ztunnel's shape, which
    `istioctl ztunnel-config` reads), `/certs` (the list its `certificates` holds),
    `/logging` (GET; POST as ztunnel's and `istioctl ztunnel-config log` send it, `?level=<logger>:<level>,<level>`,
    or Envoy's `?<logger>=<level>`: LOGGING_USAGE), `/quitquitquit` (POST), and with `store`
    `/explain?src=IP&dst=IP:PORT` (`&identity=spiffe://...` or `&plaintext=1`): the policy decision for such a
    connection, with the policies and the reason."""

    async def config_dump(_: Request) -> Response:
        if isinstance(dump, ConfigDump):  # the agent's: assembled and encoded off the loop
            return Response(200, await dump.encoded(), "application/json")
        return Response.json(dump())

    async def certificates(_: Request) -> Response:
        return Response.json(certs())

    started = _set_levels()  # as the agent started (--log-level), for ?reset

    async def get_logging(_: Request) -> Response:
        return Response.json(_levels())

    async def set_logging(req: Request) -> Response:
        try:
            changes = _level_changes({key: values[-1] for key, values in req.query.items()})
        except LogLevelError as e:
            return Response.text(f"{e}\n{LOGGING_USAGE}", 400)
        if "reset" in req.query:
            for name in _set_levels().keys() - started.keys():
                logging.getLogger(name).setLevel(logging.NOTSET)
            for name, level in started.items():
                logging.getLogger(name or None).setLevel(level)
        for name, level in changes.items():
            logging.getLogger(name or None).setLevel(level)
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


class ConfigDump:
    """The /config_dump assembler, in ztunnel's shape so that `istioctl ztunnel-config workloads|services|policies|
    certificates|all` reads it (agent.config_dump: `workloads`, `services`, `policies`, `stagedServices` from the
    store), `certificates` (ztunnel's CertsDump: see agent.identity.CertsDump), and Ambit's own sections under keys
    istioctl does not decode (e.g. ("connections", registry.snapshot), ("pool", ...), ("capture", ...),
    ("config", ...)). istioctl's decoder (istioctl/pkg/writer/ztunnel/configdump/configdump.go Prime) reads
    `services`, `workloads`, `policies`, `certificates` and `workloadstate`, matching keys without regard to case:
    a section named like one of those would be decoded as it, so only `workloadState` may be given (in ztunnel's
    shape: agent.config_dump.workload_state).

    Called, it returns the whole dump. Served (:meth:`encoded`), the store's part and the JSON text are made in
    a worker thread: every agent holds every workload of the mesh, and with 10,000 of them they took 2 s of CPU
    (1.4 s of proto-to-JSON, 0.6 s of encoding) during which the event loop, so every relay on the node, the
    metrics scrape and the readiness probe, stood still. ztunnel's admin server runs on a runtime of its own. The
    thread only reads: the store's tables are copied to lists in one C call each (under the GIL) and their protos
    are never edited, only replaced. The other sections and the certificates are read on the loop, as their
    owners change them there.

    ``trust_domain`` fills the workloads that name none, as the agent reads them (ztunnel fills in
    `cluster.local`): the agent's `--trust-domain`."""

    def __init__(
        self,
        store: WorkloadStore,
        certs: Any,
        sections: Sequence[tuple[str, Callable[[], Any]]],
        trust_domain: str = "cluster.local",
    ) -> None:
        self.store = store
        self.certs = certs
        self.sections = tuple(sections)
        self.trust_domain = trust_domain
        # A section istioctl would decode as one of its own must be in that shape: only `workloadState` may be
        # given (agent.config_dump.workload_state makes it), the others are made here.
        clashes = {name for name, _ in self.sections if name.lower() in ISTIOCTL_KEYS and name != "workloadState"}
        if clashes:
            raise ValueError(f"config_dump sections {sorted(clashes)} would be decoded by istioctl as its own")

    def __call__(self) -> dict[str, Any]:
        return self._whole(self._loop_sections())

    def _loop_sections(self) -> dict[str, Any]:
        out: dict[str, Any] = {"certificates": self.certs.snapshot()}
        for name, fn in self.sections:
            out[name] = fn()
        return out

    def _whole(self, loop_sections: dict[str, Any]) -> dict[str, Any]:
        out = ztunnel_dump(self.store, self.trust_domain)
        out.update(loop_sections)
        return out

    async def encoded(self) -> bytes:
        """The dump as Response.json encodes it, the expensive part off the event loop."""
        loop_sections = self._loop_sections()
        return await asyncio.to_thread(lambda: Response.json(self._whole(loop_sections)).body)


# The top-level keys istioctl decodes, lower-cased (Go's encoding/json matches them without regard to case):
# istioctl/pkg/writer/ztunnel/configdump/configdump.go rawDump. "workloadstate" is ztunnel's `workloadState`.
ISTIOCTL_KEYS = frozenset({"services", "workloads", "policies", "certificates", "workloadstate"})


def config_dump(
    store: WorkloadStore,
    certs: Any,
    *sections: tuple[str, Callable[[], Any]],
    trust_domain: str = "cluster.local",
) -> ConfigDump:
    """The agent's :class:`ConfigDump`."""
    return ConfigDump(store, certs, sections, trust_domain)


LOGGING_USAGE = """usage: POST /logging                                  (the current levels)
usage: POST /logging?level=<level>                    (the root logger's)
usage: POST /logging?level=<logger>:<level>,<level>   (some loggers', and the root's)
usage: POST /logging?<logger>=<level>                 (one logger's, as Envoy)
usage: POST /logging?level=<level>&reset=1            (back to the levels the agent started with, then level)
levels: trace (as debug), debug, info, warn, warning, error, critical, off
"""


def _level_changes(query: Mapping[str, str]) -> dict[str, int]:
    """The levels a /logging request sets, by logger name ("" for the root), all checked before any is set: ztunnel's
    and `istioctl ztunnel-config log`'s ``level=<logger>:<level>,<level>`` (its level names: ``warn``, ``trace``,
    ``off``; an empty ``level`` sets nothing, and the answer lists the levels), and Envoy's ``<logger>=<level>``.
    Raises LogLevelError."""
    changes: dict[str, int] = {}
    for key, value in query.items():
        if key == "reset":
            continue
        if key == "level":
            items = []
            for item in value.split(","):
                name, sep, level = item.rpartition("=" if "=" in item else ":")
                items.append(f"{name}={_python_level(level)}" if sep else _python_level(level))
            changes.update(parse_levels(",".join(items)))
        else:
            levels = parse_levels(_python_level(value))
            if set(levels) != {""}:
                raise LogLevelError(f"log level {key}={value!r}: one level for one logger")
            changes[key] = levels[""]
    return changes


def _python_level(level: str) -> str:
    """ztunnel's (tracing's) ``trace`` is Python's finest level, ``debug``."""
    return "debug" if level.strip().lower() == "trace" else level


def _set_levels() -> dict[str, int]:
    """The loggers with a level of their own, by name ("" for the root), and their levels."""
    out = {"": logging.getLogger().level}
    for name, lg in logging.Logger.manager.loggerDict.items():
        if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET:
            out[name] = lg.level
    return out


def _levels() -> dict[str, str]:
    """The levels set, by logger ("level" for the root), named as the requests name them."""
    return {name or "level": _level_name(level) for name, level in sorted(_set_levels().items())}


def _level_name(level: int) -> str:
    return "off" if level > logging.CRITICAL else logging.getLevelName(level).lower()


def metrics_server(metrics: Metrics) -> HttpServer:
    """15020: `/metrics` and `/stats/prometheus` (OpenMetrics when the scraper asks for it, gzip when it takes it)."""

    async def scrape(req: Request) -> Response:
        gzip = gzip_accepted(req.headers.get("accept-encoding", ""))
        body, content_type = await metrics.render(req.headers.get("accept"), gzip=gzip)
        encoding = (("Content-Encoding", "gzip"),) if gzip else ()
        # Accept chose the format and Accept-Encoding the coding: a cache must key the answer on both (two field
        # lines are one list, RFC 9110 5.3)
        return Response(200, body, content_type, (*encoding, ("Vary", "Accept"), ("Vary", "Accept-Encoding")))

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
