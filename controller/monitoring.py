"""The controller's monitoring surface on 15014: Prometheus metrics, debug dumps and readiness.

The HTTP/1.1 server is common/http.py's (shared with the agent's admin endpoints). Metrics live in a
per-controller registry (not prometheus-client's global one) so tests and benchmarks can run several
controllers in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common.http import Handler, HttpServer, Request, Response

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


DEBUG_PREFIX = "/debug/"
_DEBUG_REFUSED = (
    "the controller's /debug/ endpoints answer local clients only (kubectl port-forward, or kubectl exec with curl "
    "localhost:15014); --open-debug-endpoints opens them to every client\n"
)


def monitoring_server(
    routes: dict[str, Callable[[], Response]], read_timeout: float = 30.0, open_debug: bool = False
) -> HttpServer:
    """GET and HEAD on each path (all read-only). Connections stay open for scrapers that reuse them.

    The /debug/ dumps hold the whole mesh's configuration (every workload, address, identity and policy), and any
    pod can reach 15014 (Prometheus must): they answer loopback peers only unless ``open_debug``. istiod guards its
    debug endpoints likewise (ENABLE_DEBUG_ENDPOINT_AUTH, on by default: a token or localhost)."""

    def route(path: str, fn: Callable[[], Response]) -> Handler:
        guarded = path.startswith(DEBUG_PREFIX) and not open_debug

        async def handle(req: Request) -> Response:
            if guarded and not req.from_loopback:
                return Response.text(_DEBUG_REFUSED, 403)
            return fn()

        return handle

    server = HttpServer("monitoring", keep_alive=True, read_timeout=read_timeout)
    for path, fn in routes.items():
        server.routes[("GET", path)] = server.routes[("HEAD", path)] = route(path, fn)
    return server


def metrics_route(metrics: ControllerMetrics) -> Callable[[], Response]:
    return lambda: Response(200, metrics.render(), CONTENT_TYPE_LATEST)
