"""The controller's monitoring surface on 15014: Prometheus metrics, debug dumps and readiness.

A tiny HTTP/1.1 server on asyncio streams rather than a web framework: it serves a handful of GET endpoints to
Prometheus and operators, and the project adds no dependency for that. Metrics live in a per-controller registry
(not prometheus-client's global one) so tests and benchmarks can run several controllers in one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common.log import kv

log = logging.getLogger("ambit.controller.monitoring")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ControllerMetrics:
    """Controller metrics, named after istiod's ``pilot_*`` family where one exists."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.xds_clients = Gauge("pilot_xds", "Connected delta xDS streams.", registry=r)
        self.xds_pushes = Counter("pilot_xds_pushes", "Delta xDS responses sent, by type.", ["type"], registry=r)
        self.xds_push_resources = Counter(
            "ambit_xds_pushed_resources", "Resources carried in delta xDS responses, by type.", ["type"], registry=r
        )
        self.xds_push_time = Histogram(
            "pilot_xds_push_time",
            "Seconds from a config change to its response being handed to a client's stream, by type.",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.xds_ack_time = Histogram(
            "ambit_xds_ack_seconds",
            "Seconds from a config change to the client's ACK of the response carrying it, by type.",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.xds_rejects = Counter(
            "pilot_total_xds_rejects", "NACKs received from clients, by type.", ["type"], registry=r
        )
        self.config_errors = Gauge(
            "ambit_config_rejected",
            "Config objects or files currently rejected (last valid version serving).",
            registry=r,
        )
        self.config_errors_total = Counter(
            "ambit_config_errors_total", "Config rejections seen since start, by source kind.", ["source"], registry=r
        )
        self.config_objects = Gauge("ambit_config_objects", "Config objects currently serving.", registry=r)
        self.resources = Gauge("ambit_xds_resources", "Resources in the served state, by type.", ["type"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


Handler = Callable[[], Awaitable[tuple[int, str, bytes]] | tuple[int, str, bytes]]


def json_response(obj: Any, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


@dataclass
class MonitoringServer:
    """GET-only HTTP server; each path maps to a handler returning (status, content type, body)."""

    routes: dict[str, Handler]
    host: str = "0.0.0.0"
    port: int = 15014
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("monitoring listening", extra=kv(address=self.host, port=bound))
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return
                request_line, _, header_block = head.decode("latin-1").partition("\r\n")
                parts = request_line.split(" ")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in header_block.split("\r\n") if line)
                }
                if len(parts) != 3:
                    status, ctype, body = 400, "text/plain", b"bad request line\n"
                elif parts[0] not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain", b"only GET\n"
                else:
                    status, ctype, body = await self._dispatch(parts[1].split("?", 1)[0])
                keep_alive = headers.get("connection", "").lower() != "close" and parts[-1] == "HTTP/1.1"
                writer.write(
                    (
                        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                    ).encode()
                )
                if parts[0] != "HEAD":
                    writer.write(body)
                await writer.drain()
                if not keep_alive:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    async def _dispatch(self, path: str) -> tuple[int, str, bytes]:
        handler = self.routes.get(path)
        if handler is None:
            listing = "\n".join(sorted(self.routes)) + "\n"
            return 404, "text/plain", f"not found; endpoints:\n{listing}".encode()
        try:
            result = handler()
            if isinstance(result, Awaitable):
                result = await result
            return result
        except Exception as e:  # a debug endpoint must never take the controller down
            log.exception("monitoring handler failed", extra=kv(path=path))
            return 500, "text/plain", f"{type(e).__name__}: {e}\n".encode()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def metrics_route(metrics: ControllerMetrics) -> Handler:
    return lambda: (200, CONTENT_TYPE_LATEST, metrics.render())
