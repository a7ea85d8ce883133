"""ambit-agent: the node agent process.

One asyncio process per node ties the pieces together: the xDS client fills the workload store; the store drives
enrollment (eBPF capture of local enrolled pods) and the certificate manager (prefetch, drop); the listeners
(15001 outbound, 15006 inbound plaintext, 15008 HBONE) serve captured connections; admin, metrics and readiness
run beside them. Readiness is reported only after the first full config, the certificates of local enrolled
workloads, and working capture; SIGTERM drains instead of cutting connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import resource
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import heap
from agent.accesslog import AccessLog
from agent.addressing import AGENT_PORTS, workload_identity, workload_ips
from agent.admin import admin_server, config_dump, metrics_server, readiness_server
from agent.ca_client import CaClient
from agent.capture_dnat_metrics import DnatCounterCollector
from agent.capture_metrics import CaptureCollector
from agent.config_dump import workload_state
from agent.connections import ConnectionRegistry
from agent.controller_channel import ControllerChannel
from agent.identity import CertificateManager
from agent.inbound import InboundConfig, InboundPlaintextProxy, InboundProxy
from agent.inpod import InPodConnector
from agent.metrics import Metrics
from agent.metrics_expiry import SERIES_EXPIRY, SeriesExpiry
from agent.ondemand_dns import ANSWER_TTL, FAILURE_TTL, LOOKUP_TIMEOUT, OnDemandResolver
from agent.outbound import EARLY_DATA, MAX_EARLY_DATA, OutboundConfig, OutboundProxy
from agent.pod_netns import PodNetnsConfig, PodNetnsError, PodNetworks
from agent.pool import HboneConnectionPool
from agent.redirect import RedirectConfig, Redirector, cleanup
from agent.redirect_netlink import ChangeWatch
from agent.sockets import Listener, connect_upstream, transparent_listener
from agent.state import ADDRESS_TYPE, WorkloadStore
from agent.tunnel import STATS, TunnelConfig
from agent.xds import STATE_FILE, XdsClient
from api.istio.workload import workload_pb2
from common import flags, runtime
from common import log as jsonlog
from common.addresses import any_address
from common.flags import doc
from common.http import HttpServer
from common.log import kv
from common.spiffe import Identity

log = logging.getLogger("agent")

HBONE = workload_pb2.TunnelProtocol.HBONE


@dataclass
class AgentConfig:
    """The Ambit node agent: eBPF capture, HBONE mTLS tunnels, L4 policy, telemetry."""

    node: str = field(default_factory=socket.gethostname, metadata=doc("this node's name (as in Pod spec.nodeName)"))
    controller: str = field(default="127.0.0.1:15010", metadata=doc("controller gRPC address (xDS and CA)"))
    state_dir: str = field(default="/var/lib/ambit", metadata=doc("where the last good xDS state is kept"))
    token_file: str = field(default="", metadata=doc("bearer token presented to the controller"))
    root_cert: str = field(default="", metadata=doc("PEM root of the controller's CA; enables TLS to the controller"))
    trust_domain: str = field(default="cluster.local", metadata=doc("SPIFFE trust domain"))
    cert_ttl: int = field(default=24 * 3600, metadata=doc("requested workload certificate lifetime, seconds"))
    cert_min_refresh: float | None = field(
        default=None,
        metadata=doc(
            "seconds a certificate is kept at least before it is renewed, up to half of --cert-ttl (default: 1/16 of"
            " it); spaces renewals of certificates a CA near its own expiry cuts short"
        ),
    )
    instance: str = field(default="default", metadata=doc("capture instance (bpffs pin dir name)"))
    uplink: str = field(
        default="",
        metadata=doc("comma-separated uplink interfaces (default: every interface with a route through a router)"),
    )
    capture: bool = field(default=True, metadata=doc("load and attach the eBPF capture programs"))
    fail_open: bool = field(default=False, metadata=doc("debug only: let enrolled pods' SYNs pass with no agent"))
    capture_dnat: bool = field(
        default=True,
        metadata=doc("capture connections the node DNATs to enrolled pods (nftables; when it fails: not ready)"),
    )
    pod_netns_dirs: str = field(
        default="/var/run/netns,/run/netns",
        metadata=doc(
            "comma-separated directories where the container runtime keeps pods' network namespaces (containerd, "
            "CRI-O: /var/run/netns); passthrough connects from inside the pod's, as the pod's own traffic (empty: "
            "from the node's)"
        ),
    )
    pod_netns_prefix: str = field(default="", metadata=doc("only pod namespaces whose file name starts with this"))
    in_pod_hbone: bool = field(
        default=False,
        metadata=doc(
            "HBONE to other nodes leaves from inside the source pod's namespace too, as ztunnel's: the node's "
            "forward hook (egress NetworkPolicy) sees it as the pod's traffic to the peer's 15008; costs about a "
            "tenth of cross-node throughput (one more veth and a forwarding hop per packet)"
        ),
    )
    listen_address: str = field(
        default="",
        metadata=doc(
            "address of the data-path listeners (default: :: when the node has IPv6, both families; else 0.0.0.0)"
        ),
    )
    outbound_port: int = field(default=15001, metadata=doc("outbound capture listener"))
    inbound_plaintext_port: int = field(default=15006, metadata=doc("inbound plaintext capture listener"))
    hbone_port: int = field(default=15008, metadata=doc("HBONE (mTLS) listener"))
    admin_address: str = field(default="127.0.0.1", metadata=doc("admin listener address (keep it local)"))
    admin_port: int = field(default=15000, metadata=doc("admin: /config_dump /certs /logging"))
    metrics_port: int = field(default=15020, metadata=doc("Prometheus /metrics"))
    ready_port: int = field(default=15021, metadata=doc("/healthz/ready"))
    early_data: int = field(default=EARLY_DATA, metadata=doc("bytes of a client's first write sent with the CONNECT"))
    max_connections_per_client: int = field(
        default=0,
        metadata=doc(
            "connections one client address (a pod) may have open through 15001, 15006 or 15008 at once, more are "
            "reset; "
            "0: a sixteenth of the open-files limit, at least 1024"
        ),
    )
    drain_seconds: float = field(default=5.0, metadata=doc("on SIGTERM, how long established connections may finish"))
    config_wait: float = field(
        default=30.0,
        metadata=doc(
            "with no saved xDS state, seconds captured connections wait unaccepted for the first configuration "
            "(after that they are accepted, and refused while the agent knows no workload)"
        ),
    )
    dns_ttl: float = field(
        default=ANSWER_TTL,
        metadata=doc("seconds an on-demand DNS answer is kept (getaddrinfo reports no record TTL)"),
    )
    dns_failure_ttl: float = field(default=FAILURE_TTL, metadata=doc("seconds a failed on-demand DNS lookup is kept"))
    dns_timeout: float = field(default=LOOKUP_TIMEOUT, metadata=doc("seconds before an on-demand DNS lookup fails"))
    metrics_expiry: float = field(
        default=SERIES_EXPIRY,
        metadata=doc(
            "seconds a metric series of a workload gone from the agent's state stays after it last changed (0: never)"
        ),
    )
    event_loop: str = field(default="uvloop", metadata=doc("uvloop or asyncio"))
    log_level: str = field(default="info", metadata=doc(jsonlog.LOG_LEVEL_HELP))
    cleanup: bool = field(default=False, metadata=doc("remove everything the agent installed on this node, then exit"))

    def __post_init__(self) -> None:
        jsonlog.parse_levels(self.log_level)  # refused as a usage error here, not as a traceback at setup
        # Early bytes count against the peer's connection window until it answers; kept under one stream's share
        # of it (16 MiB over 200 streams) they cannot hold up the other tunnels of a pooled connection.
        if not 0 <= self.early_data <= MAX_EARLY_DATA:
            raise ValueError(f"--early-data must be 0 to {MAX_EARLY_DATA} bytes, got {self.early_data}")
        if self.max_connections_per_client < 0:
            raise ValueError(
                f"--max-connections-per-client must be 0 (automatic) or a number, got {self.max_connections_per_client}"
            )
        if not (math.isfinite(self.metrics_expiry) and self.metrics_expiry >= 0):
            raise ValueError(f"--metrics-expiry must be 0 (never) or a number of seconds, got {self.metrics_expiry}")
        for name in ("dns_ttl", "dns_failure_ttl", "dns_timeout", "config_wait"):
            seconds = getattr(self, name)
            if not (math.isfinite(seconds) and seconds > 0):  # nan and inf parse as floats too
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {seconds}")
        floor = self.cert_min_refresh
        # Above half the TTL the floor would postpone every ordinary renewal past its half-life, the margin left
        # for retries when the CA is down.
        if floor is not None and not (math.isfinite(floor) and 0 <= floor <= self.cert_ttl / 2):
            raise ValueError(
                f"--cert-min-refresh must be 0 to half of --cert-ttl ({self.cert_ttl / 2:g}) seconds, got {floor}"
            )


class Agent:
    """Owns every component's lifetime; `start()` brings them up in dependency order."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics(STATS)
        self.access_log = AccessLog(self.metrics)
        self.store = WorkloadStore()
        # One connection to the controller carries both xDS and certificate calls.
        self.controller = ControllerChannel(cfg.controller, root_cert_file=cfg.root_cert or None)
        self.xds = XdsClient(
            self.store,
            cfg.controller,
            cfg.node,
            state_dir=Path(cfg.state_dir),
            token_file=cfg.token_file or None,
            registry=self.metrics.registry,
            channel=self.controller,
        )
        self.ca = CaClient(cfg.controller, token_file=cfg.token_file or None, channel=self.controller)
        self.certs = CertificateManager(
            self.ca,
            cfg.trust_domain,
            ttl_seconds=cfg.cert_ttl,
            registry=self.metrics.registry,
            min_refresh_interval=cfg.cert_min_refresh,
        )
        self.redirector: Redirector | None = Redirector(_redirect_config(cfg)) if cfg.capture else None
        self.in_pod: InPodConnector | None = None
        dirs = tuple(d.strip() for d in cfg.pod_netns_dirs.split(",") if d.strip())
        if self.redirector is not None and dirs:
            try:
                networks = PodNetworks(PodNetnsConfig(dirs=dirs, prefix=cfg.pod_netns_prefix))
            except PodNetnsError as e:  # no right to switch namespaces: connections leave from the node's
                log.warning("pods' network namespaces out of reach", extra=kv(error=str(e)))
            else:
                self.in_pod = InPodConnector(networks, self.redirector, is_local=self._is_local_pod)
        tunnel = TunnelConfig()
        dial = self.in_pod.dial if self.in_pod is not None and cfg.in_pod_hbone else connect_upstream
        self.pool = HboneConnectionPool(config=tunnel, stats=STATS, dial=dial)
        self.connections = ConnectionRegistry(self.store, self.metrics)
        common = (self.metrics, self.access_log, self.connections)
        # Istio's ports are refused wherever ztunnel refuses them, and so are the ones this agent listens on when
        # they were moved: a connection to them on this node's addresses would loop into its own listeners.
        own = AGENT_PORTS | {cfg.outbound_port, cfg.inbound_plaintext_port, cfg.hbone_port}
        outbound = OutboundConfig(
            early_data=cfg.early_data, own_ports=own, nat_replies_steered=cfg.capture and cfg.capture_dnat
        )
        resolver = OnDemandResolver(ttl=cfg.dns_ttl, failure_ttl=cfg.dns_failure_ttl, timeout=cfg.dns_timeout)
        self.outbound = OutboundProxy(
            self.store, self.certs, self.pool, cfg.node, *common, outbound, resolver, in_pod=self.in_pod
        )
        inbound = InboundConfig(own_ports=own)
        self.inbound = InboundProxy(
            self.store, self.certs, cfg.node, *common, inbound, tunnel_config=tunnel, tunnel_stats=STATS
        )
        self.plaintext = InboundPlaintextProxy(self.store, cfg.node, *common, inbound, trust_domain=cfg.trust_domain)
        self.dnat_counters: DnatCounterCollector | None = None
        if self.redirector is not None:
            self.metrics.registry.register(CaptureCollector(self.redirector))
            if cfg.capture_dnat:
                self.dnat_counters = DnatCounterCollector(cfg.instance)
                self.metrics.registry.register(self.dnat_counters)
        self.listeners: list[Listener] = []
        self.servers: list[HttpServer] = []
        self.stopping = asyncio.Event()
        self.draining = False
        self._reconcile_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._capture_error: str | None = None
        self._captured_config = False  # a reconcile has applied a whole configuration (readiness waits for it)
        self._reconcile_error = ""  # why the last reconcile failed, for readiness
        self._hold_timer: asyncio.TimerHandle | None = None  # the reconcile that ends a reused-address hold

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        # Readiness, metrics and admin first, so probes and operators see *why* the agent is not ready yet.
        # The kubelet probes and Prometheus scrapes the pod (node) IP: every address, of the data path's family
        # (`--listen-address ::` is dual-stack, and what an IPv6-only node needs).
        listen = cfg.listen_address or any_address()
        anywhere = "::" if ":" in listen else "0.0.0.0"
        await self._serve(readiness_server(self.readiness), anywhere, cfg.ready_port)
        await self._serve(metrics_server(self.metrics), anywhere, cfg.metrics_port)
        dump = config_dump(
            self.store,
            self.certs,
            ("connections", self.connections.snapshot),
            ("pool", self.pool.snapshot),
            ("capture", self._capture_status),
            ("config", lambda: {k: v for k, v in vars(cfg).items() if k != "token_file"}),
            ("workloadState", self._workload_state),
            trust_domain=cfg.trust_domain,
        )
        admin = admin_server(dump, self.certs.snapshot, self.stopping.set, self.store, cfg.trust_domain)
        await self._serve(admin, cfg.admin_address, cfg.admin_port)

        # The last good state before the listeners: a restarted agent's listeners get connections from the previous
        # one's pinned filters at once, and against an empty store each was refused (unknown source/destination,
        # a reset) for as long as the programs took to compile, 1-3 s on every restart. Restored, they wait for
        # their certificate instead. A small local file, read once before anything is served.
        self.xds.restore()
        # Listeners before capture: a captured SYN must always find its listener (else it is dropped, fail closed).
        # Each listener is bounded per client address: every pod of the node shares the agent's descriptors, and one
        # pod's flood took them all. 15008's clients are pods too (their agents tunnel from the pod's address, one
        # pooled connection per destination pod): 1,000 idle mTLS connections of one peer held 49 MB.
        per_pod = per_client_limit(cfg.max_connections_per_client, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for port, handler, name in (
            (cfg.outbound_port, self.outbound.handle, "outbound"),
            (cfg.inbound_plaintext_port, self.plaintext.handle, "inbound_plaintext"),
            (cfg.hbone_port, self.inbound.handle, "inbound"),
        ):
            gone = functools.partial(self.access_log.refused, name, reason="client_reset")
            refused = functools.partial(self.access_log.refused, name)
            listener = Listener(
                transparent_listener(port, listen), handler, name, gone=gone, max_per_client=per_pod, refused=refused
            )
            self.listeners.append(listener)
        if self.xds.has_config:
            self._accept()
        else:
            self._tasks.append(asyncio.create_task(self._accept_when_configured(), name="accept-when-configured"))

        self.certs.start()
        self.store.subscribe(lambda _change: self._reconcile_wanted.set())
        if self.xds.restored:  # applied before this subscription: enroll and prefetch from it now
            self._reconcile_wanted.set()
        # xDS before the programs compile (1-3 s, off the loop): an agent with no saved state learns its workloads
        # meanwhile, and the connections held for them wait that much less. The reconcile loop, the only other
        # user of the redirector, starts after the compile and finds the store's changes waiting.
        self._tasks.append(asyncio.create_task(self.xds.run(), name="xds"))

        if self.redirector is not None:
            try:
                await asyncio.to_thread(self.redirector.start)
            except Exception as e:  # precise reason comes from the redirect module's exceptions
                self._capture_error = f"{type(e).__name__}: {e}"
                log.error("capture unavailable", extra=kv(error=self._capture_error))
            if (watch := self.redirector.change_watch) is not None:
                # A pod interface re-created with its IP is news to capture, not to the controller.
                asyncio.get_running_loop().add_reader(watch.fileno(), self._capture_changed, watch)

        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconcile"))
        if self.redirector is not None:
            self._tasks.append(asyncio.create_task(self._reconcile_periodically(), name="reconcile-timer"))
        if self.dnat_counters is not None:
            self._tasks.append(asyncio.create_task(self.dnat_counters.run(), name="dnat-counters"))
        if cfg.metrics_expiry:
            expiry = SeriesExpiry(
                self.metrics, self.store.all_workloads, cfg.metrics_expiry, services=self.store.all_services
            )
            self.metrics.registry.register(expiry)
            self._tasks.append(asyncio.create_task(expiry.run(), name="metrics-expiry"))
        log.info("agent started", extra=kv(node=cfg.node, controller=cfg.controller, capture=cfg.capture))

    def _accept(self) -> None:
        for listener in self.listeners:
            listener.start()

    async def _accept_when_configured(self) -> None:
        """With no saved state the agent knows no workload until the controller answers, while the previous agent's
        pinned filters already steer enrolled pods' connections here: accepted now, every one was refused (unknown
        source or destination, a reset). Unaccepted, the kernel completes their handshakes into the listeners'
        backlogs (SYNs beyond that are dropped and sent again), and they are served once the configuration is in.
        Past `config_wait` they are accepted anyway, and refused and logged, rather than held without a trace.
        The store may not change with the last type's first response (no policies): capture is reconciled then."""
        log.info("holding captured connections until the first configuration", extra=kv(seconds=self.cfg.config_wait))
        configured = asyncio.ensure_future(self.xds.ready.wait())
        try:
            if not (await asyncio.wait({configured}, timeout=self.cfg.config_wait))[0]:
                log.warning(
                    "no configuration yet: accepting captured connections without it",
                    extra=kv(seconds=self.cfg.config_wait, reason=self.xds.not_ready_reason()),
                )
            if not self.draining:  # a drain closed the listening sockets; nothing left to accept on
                self._accept()
            await configured
        finally:
            configured.cancel()
        self._reconcile_wanted.set()

    async def _serve(self, server: HttpServer, host: str, port: int) -> None:
        await server.start(host, port)
        self.servers.append(server)

    async def drain_and_stop(self) -> None:
        """Stop accepting, give established connections `drain_seconds`, then close. Capture stays attached so
        enrolled pods fail closed until the next agent takes over from the pinned maps."""
        self.draining = True
        log.info("draining", extra=kv(seconds=self.cfg.drain_seconds, connections=len(self.connections)))
        for listener in self.listeners:
            await listener.stop_accepting()
        # As ztunnel's graceful shutdown: GOAWAY on inbound HBONE, so peers dial again (the node's next agent takes
        # their new connections) while the streams already open get the drain time to finish.
        told = self.inbound.hbone_connections.drain()
        log.info("sent GOAWAY to HBONE clients", extra=kv(connections=told))
        in_flight = [task for listener in self.listeners for task in listener.tasks]
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.cfg.drain_seconds)
        for listener in self.listeners:
            await listener.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close()
        if self.in_pod is not None:
            self.in_pod.close()
        await self.certs.close()
        await self.ca.close()
        await self.controller.close()
        for server in self.servers:
            await server.close()
        if self.redirector is not None:
            if (watch := self.redirector.change_watch) is not None:
                asyncio.get_running_loop().remove_reader(watch.fileno())
            await asyncio.to_thread(self.redirector.close)  # netlink calls block: never on the loop thread
        log.info("stopped")

    # --- enrollment: store -> capture + certificates ------------------------------------------------------------

    def local_workloads(self) -> list[Any]:
        return list(self.store.local_workloads(self.cfg.node))

    def _is_local_pod(self, ip: str) -> bool:
        wl = self.store.workload_by_ip(ip)
        return wl is not None and wl.node == self.cfg.node

    def enrolled_local(self) -> list[Any]:
        return [wl for wl in self.local_workloads() if wl.tunnel_protocol == HBONE]

    def _identity(self, wl: Any) -> Identity:
        return workload_identity(wl, self.cfg.trust_domain)

    def _capture_changed(self, watch: ChangeWatch) -> None:
        # Not before the config is complete: a reconcile against an empty store would release every enrolled pod.
        if watch.drain() and self.xds.has_config:
            self._reconcile_wanted.set()

    async def _reconcile_loop(self) -> None:
        """Coalesces bursts of store changes into one reconcile; netlink and map updates run off the loop."""
        while True:
            await self._reconcile_wanted.wait()
            self._reconcile_wanted.clear()
            configured = self.xds.has_config
            enrolled = self.enrolled_local()
            idents = {self._identity(wl) for wl in enrolled}
            self.certs.prefetch(idents)
            self.certs.retain_only(idents)
            if self.redirector is None or self._capture_error:
                continue
            if self.in_pod is not None:
                self.in_pod.retain(ip for wl in enrolled for ip in workload_ips(wl))
            local_ips = {ip for wl in self.local_workloads() for ip in workload_ips(wl)}
            # Every enrolled address, with who the controller says holds it as of which version: an address that
            # reappears behind another interface under the same token is a new sandbox the controller has not named
            # yet, and is held.
            versions = self.store.versions(ADDRESS_TYPE)
            owners = {ip: f"{wl.uid}@{versions.get(wl.uid, '')}" for wl in enrolled for ip in workload_ips(wl)}
            try:
                failures = await asyncio.to_thread(self.redirector.reconcile, set(owners), local_ips, owners)
            except Exception as e:
                self._reconcile_error = f"{type(e).__name__}: {e}"
                log.error("capture reconcile failed", extra=kv(error=self._reconcile_error))
                continue
            self._reconcile_error = ""
            self._captured_config |= configured
            for ip, why in failures.items():
                log.warning("workload not captured", extra=kv(ip=ip, reason=why))
            self._reconcile_when_a_hold_expires()

    async def _reconcile_periodically(self) -> None:
        """Netlink tells capture of every change to the interfaces and filters it owns, but nothing tells it that its
        nftables table was flushed (a firewall reload starts with `flush ruleset`): a reconcile now and then puts it
        back (one nft read when nothing changed)."""
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            if self.xds.has_config:  # as _capture_changed: an empty store would release every enrolled pod
                self._reconcile_wanted.set()

    def _reconcile_when_a_hold_expires(self) -> None:
        """An address held for a re-created pod interface is released by a reconcile once its time is up, and
        nothing else may ask for one (a static config sends no change)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        delay = self.redirector.hold_expires_in() if self.redirector is not None else None
        if delay is not None:
            self._hold_timer = asyncio.get_running_loop().call_later(delay + 0.1, self._reconcile_wanted.set)

    # --- readiness ---------------------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.xds.has_config:
            return False, self.xds.not_ready_reason()
        missing = [str(i) for i in {self._identity(wl) for wl in self.enrolled_local()} if not self._has_cert(i)]
        if missing:
            return False, f"waiting for certificates: {', '.join(sorted(missing))}"
        if self.redirector is not None:
            if self._capture_error:
                return False, f"capture unavailable: {self._capture_error}"
            # Before the first reconcile the redirector has no enrolled pod asked of it, and says ready.
            if not self._captured_config:
                why = f" (last attempt: {self._reconcile_error})" if self._reconcile_error else ""
                return False, f"capture not yet applied to the configuration{why}"
            if not self.redirector.ready:
                return False, f"capture not ready: {json.dumps(self.redirector.status().get('failures', {}))}"
        return True, "ready"

    def _has_cert(self, ident: Identity) -> bool:
        return self.certs.certificate(ident) is not None

    def _workload_state(self) -> dict[str, Any]:
        enrolled = set(self._capture_status().get("enrolled", ()))
        return workload_state(self.store, self.cfg.node, enrolled, self.connections.tracked(), self.outbound.carried())

    def _capture_status(self) -> dict[str, Any]:
        if self.redirector is None:
            return {"enabled": False}
        if self._capture_error:
            return {"enabled": True, "error": self._capture_error}
        return {"enabled": True, **self.redirector.status()}


def _redirect_config(cfg: AgentConfig) -> RedirectConfig:
    return RedirectConfig(
        instance=cfg.instance,
        outbound_port=cfg.outbound_port,
        inbound_port=cfg.inbound_plaintext_port,
        hbone_port=cfg.hbone_port,
        uplinks=tuple(u for u in cfg.uplink.split(",") if u),
        fail_open=cfg.fail_open,
        capture_dnat=cfg.capture_dnat,
    )


LOCK_FILE = "agent.lock"
RECONCILE_INTERVAL = 60.0  # seconds between reconciles nothing asked for (see _reconcile_periodically)


class StateDirInUse(Exception):
    """A running agent holds the state directory's lock."""


def _lock_state(state_dir: Path, *, create: bool) -> int | None:
    """An exclusive flock on ``<state-dir>/agent.lock``; the descriptor is never closed, so it lasts as long as the
    process, and the kernel drops it however the process ends. The agent holds it so that `--cleanup` can tell a
    running (or still draining) agent, whose change watch would put back the filters the cleanup removes, from one
    that is gone. Without ``create``, None when there is no lock file: no agent ran with this directory."""
    open_flags = os.O_RDWR | os.O_CLOEXEC
    if create:
        state_dir.mkdir(parents=True, exist_ok=True)
        open_flags |= os.O_CREAT
    try:
        fd = os.open(state_dir / LOCK_FILE, open_flags, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirInUse(f"{state_dir / LOCK_FILE} is locked by a running agent") from None
    return fd


def _remove_state(state_dir: Path) -> list[str]:
    """The saved xDS state goes with the capture: a later install restoring it would act on a stale cluster until
    its controller answered. The directory too, when nothing else is in it."""
    removed = []
    state = state_dir / STATE_FILE
    with contextlib.suppress(FileNotFoundError):
        state.unlink()
        removed.append(f"xDS state file {state}")
    with contextlib.suppress(FileNotFoundError):
        (state_dir / LOCK_FILE).unlink()  # ours: the caller holds it
    with contextlib.suppress(OSError):  # not empty, absent, or a mount point: left as it is
        state_dir.rmdir()
        removed.append(f"state directory {state_dir}")
    return removed


async def _run(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    # Blocking work (netlink, BPF maps, the state file) is short and rare: one worker thread, not one per burst.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocking"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    try:
        await agent.start()
    except OSError as e:
        log.error("cannot start", extra=kv(error=str(e)))
        await agent.drain_and_stop()
        return 1
    runtime.freeze_startup_heap()
    trimmer = heap.HeapTrimmer(idle=lambda: agent.metrics.open_connections() == 0)
    trimmer.start()
    await agent.stopping.wait()
    trimmer.stop()
    await agent.drain_and_stop()
    return 0


def per_client_limit(configured: int, open_files: int) -> int:
    """--max-connections-per-client, or for 0 a sixteenth of the open-files limit (at least 1024): a connection
    through the agent holds two sockets and, spliced, two pipe ends, so one pod can take at most a quarter of the
    agent's descriptors (with the limit raised to the kernel's maximum, 65,536 connections at 1,048,576)."""
    return configured or max(1024, open_files // 16)


def main(argv: Sequence[str] | None = None) -> None:
    heap.one_arena()
    cfg = flags.parse(AgentConfig, argv)
    jsonlog.setup(cfg.log_level)
    state_dir = Path(cfg.state_dir)
    if cfg.cleanup:
        try:
            _lock_state(state_dir, create=False)
        except (StateDirInUse, OSError) as e:
            log.error("cleanup refused", extra=kv(state_dir=str(state_dir), error=str(e)))
            raise SystemExit(1) from None
        removed = cleanup(_redirect_config(cfg)) + _remove_state(state_dir)
        log.info("cleanup done", extra=kv(instance=cfg.instance, removed=removed))
        return
    try:
        _lock_state(state_dir, create=True)
    except (StateDirInUse, OSError) as e:
        log.warning("state directory not locked: --cleanup cannot see this agent", extra=kv(error=str(e)))
    runtime.run(lambda: _run(cfg), cfg.event_loop)


if __name__ == "__main__":
    main()
