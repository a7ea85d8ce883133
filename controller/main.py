"""ambit-controller: reads config, serves it to agents over delta xDS, and runs the CA.

Start-up order matters for agents: the config sources are synced *before* any xDS port opens, so a connecting
agent never receives a partial state (which would delete workloads it already knows). Monitoring opens first so
that readiness probes and operators can see why the controller is not serving yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from common import flags, runtime
from common import log as jsonlog
from common.addresses import any_address
from common.flags import doc
from common.http import Response
from common.log import kv
from controller import node_auth
from controller.monitoring import ControllerMetrics, metrics_route, monitoring_server
from controller.sources.files import ConfigDirError, FileSource
from controller.sources.last_good import default_state_dir
from controller.store import ConfigStore
from controller.translate import Translator, TranslatorConfig
from controller.xds_server import GRPC_SERVER_OPTIONS, Authenticator, XdsServer

log = logging.getLogger("ambit.controller")


@dataclass
class ControllerConfig:
    """Ambit controller: config sources -> workload API over delta xDS, plus the mesh CA."""

    config_dir: str = field(default="", metadata=doc("directory of YAML config, watched for changes"))
    state_dir: str = field(
        default="",
        metadata=doc(
            "where --config-dir's last good objects are saved, so a restart keeps serving an object whose file went"
            " bad (default: beside the config directory, .<name>.ambit-state)"
        ),
    )
    kube: bool = field(default=False, metadata=doc("read config from the Kubernetes API instead"))
    kubeconfig: str = field(default="", metadata=doc("kubeconfig file for --kube (default: in-cluster)"))
    xds_port: int = field(default=15010, metadata=doc("plaintext gRPC port (xDS, CA) for the lab; 0 turns it off"))
    tls_port: int = field(default=15012, metadata=doc("gRPC over TLS (xDS + CA); needs --ca-dir; 0 turns it off"))
    monitoring_port: int = field(default=15014, metadata=doc("HTTP /metrics, /debug/*, /healthz/ready; 0 off"))
    open_debug_endpoints: bool = field(
        default=False,
        metadata=doc("answer /debug/* on the monitoring port to every client, not only local ones (the mesh's config)"),
    )
    listen_address: str = field(
        default="", metadata=doc("address the listeners bind (default: :: where the kernel has IPv6, else 0.0.0.0)")
    )
    ca_dir: str = field(default="", metadata=doc("CA directory (created if empty); enables the CA and TLS port"))
    ca_secret: str = field(
        default="",
        metadata=doc("NAMESPACE/NAME of a Secret holding the CA (--kube): shared by replicas, mirrored to --ca-dir"),
    )
    root_configmap: str = field(
        default="",
        metadata=doc("NAMESPACE/NAME of a ConfigMap to publish the trust bundle in (with --ca-secret)"),
    )
    trust_domain: str = field(default="cluster.local", metadata=doc("SPIFFE trust domain"))
    node_tokens: str = field(default="", metadata=doc('JSON {"<node>": "<token>"} authenticating agents'))
    token_review_cache_seconds: float = field(
        default=node_auth.ACCEPTED_CACHE_SECONDS,
        metadata=doc(
            "--kube: seconds an agent's accepted token is remembered (a deleted agent pod keeps its access that long"
            " at most); 0 reviews every request"
        ),
    )
    token_review_cache_size: int = field(
        default=node_auth.ACCEPTED_CACHE_SIZE,
        metadata=doc("--kube: accepted tokens remembered at most (the oldest goes first); 0 remembers none"),
    )
    token_review_failure_cache_seconds: float = field(
        default=node_auth.REFUSED_CACHE_SECONDS,
        metadata=doc(
            "--kube: seconds a refused token (not authenticated, untrusted account, pod gone) is answered without a"
            " new review; 0 lets every retry reach the API server"
        ),
    )
    token_review_failure_cache_size: int = field(
        default=node_auth.REFUSED_CACHE_SIZE,
        metadata=doc("--kube: refused tokens remembered at most, apart from the accepted ones; 0 remembers none"),
    )
    token_review_timeout_seconds: float = field(
        default=node_auth.REVIEW_TIMEOUT_SECONDS,
        metadata=doc(
            "--kube: seconds each API call of a token review (the TokenReview, then the agent's pod) may take before"
            " the agent's request is refused as UNAVAILABLE, which it retries"
        ),
    )
    cluster_id: str = field(default="Kubernetes", metadata=doc("cluster id written into workload uids"))
    root_namespace: str = field(default="istio-system", metadata=doc("mesh root namespace (global policies)"))
    poll_interval: float = field(default=0.2, metadata=doc("seconds between config directory scans"))
    cut_short_wait: float = field(
        default=5.0,
        metadata=doc(
            "seconds a config file that looks cut short by a writer (empty, no final newline, its last document"
            " invalid) must hold still before the objects it no longer holds are removed; its other changes apply"
            " at once"
        ),
    )
    debounce_quiet: float = field(default=0.02, metadata=doc("push after this many quiet seconds"))
    debounce_max: float = field(default=1.0, metadata=doc("push at the latest this long after a change"))
    event_loop: str = field(default="uvloop", metadata=doc("uvloop or asyncio"))
    log_level: str = field(default="info", metadata=doc(jsonlog.LOG_LEVEL_HELP))

    def __post_init__(self) -> None:
        jsonlog.parse_levels(self.log_level)  # refused as a usage error here, not as a traceback at setup
        for name in (
            "cut_short_wait",
            "token_review_cache_seconds",
            "token_review_cache_size",
            "token_review_failure_cache_seconds",
            "token_review_failure_cache_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must not be negative, got {getattr(self, name)}")
        timeout = self.token_review_timeout_seconds
        if not (math.isfinite(timeout) and timeout > 0):  # nan and inf parse as floats too
            raise ValueError(f"--token-review-timeout-seconds: must be a positive number of seconds, got {timeout}")

    def bind_address(self) -> str:
        return self.listen_address or any_address()

    def files_state_dir(self) -> str:
        return self.state_dir or default_state_dir(self.config_dir)

    def token_review(self, api_client: Any) -> node_auth.TokenReviewAuthenticator:
        """The TokenReview authenticator of ``--kube``, with this config's caches and timeout."""
        return node_auth.TokenReviewAuthenticator(
            api_client,
            cache_seconds=self.token_review_cache_seconds,
            cache_size=self.token_review_cache_size,
            failure_cache_seconds=self.token_review_failure_cache_seconds,
            failure_cache_size=self.token_review_failure_cache_size,
            request_timeout=self.token_review_timeout_seconds,
        )


class StartupError(Exception):
    """A configuration problem that stops the controller before it serves anything."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Controller:
    def __init__(self, cfg: ControllerConfig) -> None:
        if bool(cfg.config_dir) == bool(cfg.kube):
            raise StartupError("exactly one of --config-dir DIR or --kube is required")
        self.cfg = cfg
        self.metrics = ControllerMetrics()
        self.translator = Translator(
            TranslatorConfig(
                cluster_id=cfg.cluster_id, root_namespace=cfg.root_namespace, trust_domain=cfg.trust_domain
            )
        )
        self.store = ConfigStore(self.translator, self.metrics)
        self.xds = XdsServer(metrics=self.metrics, debounce_quiet=cfg.debounce_quiet, debounce_max=cfg.debounce_max)
        self.store.subscribe(self.xds.apply_delta)
        self.stopping = asyncio.Event()
        self.ready = False
        self._servers: list[grpc.aio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Any]] = []
        self.monitoring = monitoring_server(
            {
                "/metrics": metrics_route(self.metrics),
                "/debug/config_dump": lambda: Response.json(self.xds.config_dump(), sort_keys=True),
                "/debug/config_status": lambda: Response.json(self.store.status(), sort_keys=True),
                "/debug/connections": lambda: Response.json(self.xds.describe_connections(), sort_keys=True),
                "/healthz/ready": self._readiness,
                "/ready": self._readiness,
            },
            open_debug=cfg.open_debug_endpoints,
        )

    def _readiness(self) -> Response:
        return Response.text("ready\n") if self.ready else Response.text("config not synced yet\n", 503)

    async def start(self) -> None:
        cfg = self.cfg
        address = cfg.bind_address()
        if cfg.monitoring_port:
            await self.monitoring.start(address, cfg.monitoring_port)
            log.info("monitoring listening", extra=kv(address=address, port=self.monitoring.port))
        await self._start_sources()
        await self._sync_ca_secret()
        authenticator, grpc_services = self._grpc_services()
        if cfg.xds_port:
            server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
            # The plaintext port is the lab's: tokens still authenticate the CA, xDS is open as in Istio's 15010.
            self.xds.add_to_server(server)
            for register in grpc_services:
                register(server)
            bound = server.add_insecure_port(_hostport(address, cfg.xds_port))
            await server.start()
            self._servers.append(server)
            log.info("xds listening", extra=kv(address=address, port=bound, tls=False))
        if cfg.tls_port and cfg.ca_dir:
            from controller.ca_service import server_credentials

            server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
            self.xds.add_to_server(server, authenticate=authenticator)
            for register in grpc_services:
                register(server)
            bound = server.add_secure_port(_hostport(address, cfg.tls_port), server_credentials(self._ca))
            await server.start()
            self._servers.append(server)
            log.info("xds listening", extra=kv(address=address, port=bound, tls=True))
        elif cfg.tls_port:
            log.info("TLS port off: no --ca-dir")
        self.ready = True
        log.info("controller ready", extra=kv(objects=len(self.translator.objects()), errors=len(self.store.errors())))

    async def _start_sources(self) -> None:
        cfg = self.cfg
        if cfg.config_dir:
            source = FileSource(
                cfg.config_dir,
                self.store,
                poll_interval=cfg.poll_interval,
                state_dir=cfg.files_state_dir(),
                cut_short_wait=cfg.cut_short_wait,
            )
            try:
                await source.initial_sync()
            except ConfigDirError as e:
                raise StartupError(str(e)) from None
            self._tasks.append(asyncio.create_task(source.run(), name="config-dir"))
        else:
            from controller.sources.kube import KubeSource, api_client

            kube = KubeSource(self.store, api_client(cfg.kubeconfig or None))
            self._closers.append(kube.stop)
            await kube.start()

    async def _sync_ca_secret(self) -> None:
        """--ca-secret: mirror the replicas' shared CA into --ca-dir before the CA loads, and keep it mirrored."""
        cfg = self.cfg
        if not cfg.ca_secret:
            return
        if not (cfg.kube and cfg.ca_dir):
            raise StartupError("--ca-secret needs --kube and --ca-dir (the directory the Secret is mirrored into)")
        from controller.ca_secret import CaSecret, CaSecretError, parse_secret_ref
        from controller.sources.kube import api_client

        try:
            namespace, name = parse_secret_ref(cfg.ca_secret)
            publish = parse_secret_ref(cfg.root_configmap, "--root-configmap") if cfg.root_configmap else None
            client = api_client(cfg.kubeconfig or None)
            secret = CaSecret(client, namespace, name, cfg.ca_dir, cfg.trust_domain, root_configmap=publish)
            await asyncio.to_thread(secret.sync)
        except (CaSecretError, OSError) as e:
            raise StartupError(str(e)) from None
        self._tasks.append(asyncio.create_task(secret.run(), name="ca-secret"))

    def _grpc_services(self) -> tuple[Authenticator | None, list[Callable[[grpc.aio.Server], Any]]]:
        """The node authenticator for xDS over TLS, and the CA service registration (when --ca-dir is set)."""
        cfg = self.cfg
        if not cfg.ca_dir:
            return None, []
        from controller import ca_service
        from controller.ca import CaError, CertificateAuthority

        try:
            self._ca = CertificateAuthority(cfg.ca_dir, cfg.trust_domain)
        except (CaError, OSError) as e:
            raise StartupError(f"--ca-dir {cfg.ca_dir}: {e}") from None
        authn: list[Any] = []
        if cfg.node_tokens:
            try:
                authn.append(node_auth.NodeTokenAuthenticator(cfg.node_tokens))
            except node_auth.AuthError as e:
                raise StartupError(f"--node-tokens: {e}") from None
        if cfg.kube:
            from controller.sources.kube import api_client

            authn.append(cfg.token_review(api_client(cfg.kubeconfig or None)))
        if not authn:
            raise StartupError("--ca-dir needs a way to authenticate agents: --node-tokens FILE or --kube")
        authenticator = authn[0] if len(authn) == 1 else node_auth.FirstMatchAuthenticator(authn)
        ca = self._ca
        service: list[Any] = []  # one CertificateService (and one set of its metrics) for every port

        def register(server: grpc.aio.Server) -> None:
            from api.istio.v1.auth import ca_pb2_grpc

            if service:
                ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service[0], server)
            else:
                service.append(
                    ca_service.add_to_server(server, ca, self.translator, authenticator, registry=self.metrics.registry)
                )

        return node_auth.for_xds(authenticator), [register]

    async def stop(self) -> None:
        self.ready = False
        for server in self._servers:
            await server.stop(grace=2.0)
        await self.xds.stop()
        for task in self._tasks:
            task.cancel()
        for close in self._closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await self.monitoring.close()


async def _run(cfg: ControllerConfig) -> int:
    loop = asyncio.get_running_loop()
    try:
        controller = Controller(cfg)
    except StartupError as e:
        log.error("cannot start", extra=kv(error=str(e)))
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.stopping.set)
    starting = asyncio.create_task(controller.start())
    stop_wait = asyncio.create_task(controller.stopping.wait())
    # A SIGTERM while the sources are still syncing (e.g. an unreachable API server) must not be ignored.
    await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopping before start-up completed")
        await controller.stop()
        return 0
    try:
        starting.result()
    except StartupError as e:
        log.error("cannot start", extra=kv(error=str(e)))
        await controller.stop()
        return 2
    except OSError as e:
        log.error("cannot listen", extra=kv(error=str(e)))
        await controller.stop()
        return 1
    runtime.freeze_startup_heap()
    await controller.stopping.wait()
    log.info("stopping")
    await controller.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    cfg = flags.parse(ControllerConfig, argv)
    jsonlog.setup(cfg.log_level)
    runtime.run(lambda: _run(cfg), cfg.event_loop)


if __name__ == "__main__":
    main()
