"""A two-node mesh on loopback for the proxy integration tests: real listeners, real mTLS/HBONE, a real
WorkloadStore filled from protobufs, echo servers as pods.

Every address is inside a random 127.A.B.0/24 of this run, so concurrent runs (and other engineers' tests)
never collide. The eBPF capture is not part of these tests (it has its own); a "captured" outbound
connection is a listener whose original destination is fixed, which is exactly what the handler receives
from a transparent listener.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from dataclasses import dataclass, field
from typing import Any

from agent.accesslog import AccessLog
from agent.admin import metrics_server
from agent.connections import ConnectionRegistry
from agent.inbound import InboundPlaintextProxy, InboundProxy
from agent.metrics import Metrics, sample_value
from agent.outbound import OutboundConfig, OutboundProxy
from agent.pool import HboneConnectionPool
from agent.sockets import Address, Listener, original_destination, transparent_listener
from agent.state import AUTHORIZATION_TYPE, WorkloadStore, policy_key
from agent.tunnel import TunnelStats
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from common.http import HttpServer
from common.spiffe import Identity
from tests.support.proxy_certs import StaticCertificates
from tests.support.proxy_echo import echo_server
from tests.support.workloads import pod_workload

TD = "cluster.local"
ECHO_PORT = 8080
SERVICE_PORT = 80
SVC_HOST = "echo.server.svc.cluster.local"


@dataclass
class Agent:
    """One node's proxy side, wired as agent/main.py wires it."""

    node: str
    store: WorkloadStore
    certs: StaticCertificates
    stats: TunnelStats = field(default_factory=TunnelStats)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.stats)
        self.access = AccessLog(self.metrics, logging.getLogger(f"access.{self.node}"))
        self.connections = ConnectionRegistry(self.store, self.metrics)
        self.pool = HboneConnectionPool(stats=self.stats)
        self.outbound = OutboundProxy(
            self.store,
            self.certs,
            self.pool,
            self.node,
            self.metrics,
            self.access,
            self.connections,
            OutboundConfig(loopback_upstreams=True),  # this mesh's pods live on 127.A.B.x
        )
        self.inbound = InboundProxy(
            self.store, self.certs, self.node, self.metrics, self.access, self.connections, tunnel_stats=self.stats
        )
        self.plaintext = InboundPlaintextProxy(
            self.store, self.node, self.metrics, self.access, self.connections, trust_domain=self.certs.trust_domain
        )
        self.listeners: list[Listener] = []
        self.http: HttpServer | None = None

    def listen(self, sock: socket.socket, handler: Any, name: str, orig_dst: Address | None = None) -> Listener:
        lst = Listener(sock, handler, name, (lambda _s: orig_dst) if orig_dst else original_destination)
        self.listeners.append(lst)
        lst.start()
        return lst

    def capture_outbound(self, dst: Address) -> Address:
        """Where a pod's connection to `dst` lands: the outbound handler with `dst` as original destination."""
        sock = transparent_listener(0, "127.0.0.1", transparent=False)
        return self.listen(sock, self.outbound.handle, "outbound", dst).address

    def capture_plaintext(self, dst: Address) -> Address:
        sock = transparent_listener(0, "127.0.0.1", transparent=False)
        return self.listen(sock, self.plaintext.handle, "inbound_plaintext", dst).address

    def serve_hbone(self, pod_ip: str) -> None:
        """The HBONE listener as the redirect delivers to it: local address = podIP:15008."""
        self.listen(transparent_listener(15008, pod_ip, transparent=True), self.inbound.handle, "inbound")

    async def start_metrics(self) -> int:
        self.http = metrics_server(self.metrics)
        await self.http.start("127.0.0.1", 0)
        return self.http.port

    async def close(self) -> None:
        for lst in self.listeners:
            await lst.close()
        await self.pool.close()
        if self.http is not None:
            await self.http.close()


class Mesh:
    """Pods: client (sleep) and other (curl) on n1; echo-1 on n2; echo-2 on n1; legacy (not in the mesh) on
    n1; service echo (VIP :80 -> 8080) over echo-1."""

    def __init__(self) -> None:
        a, b = random.randint(64, 250), random.randint(1, 250)
        self.net = f"127.{a}.{b}."
        self.ip = {
            "client": self.net + "10",
            "other": self.net + "11",
            "echo-1": self.net + "20",
            "echo-2": self.net + "21",
            "legacy": self.net + "30",
            "stranger": self.net + "99",  # no workload has this address
            "vip": self.net + "100",
        }
        self.certs = StaticCertificates(TD)
        self.store = WorkloadStore()
        svc_ports = {f"server/{SVC_HOST}": wpb.PortList(ports=[wpb.Port(service_port=80, target_port=ECHO_PORT)])}
        self.workloads = {
            "client": pod_workload("sleep-1", "client", self.ip["client"], sa="sleep", node="n1", deployment="sleep"),
            "other": pod_workload("curl-1", "client", self.ip["other"], sa="curl", node="n1", deployment="curl"),
            "echo-1": pod_workload(
                "echo-1", "server", self.ip["echo-1"], sa="echo", node="n2", deployment="echo", services=svc_ports
            ),
            "echo-2": pod_workload("echo-2", "server", self.ip["echo-2"], sa="echo", node="n1", deployment="echo"),
            "legacy": pod_workload(
                "legacy-1", "legacy", self.ip["legacy"], sa="default", node="n1", hbone=False, deployment="legacy"
            ),
        }
        self.service = wpb.Service(
            name="echo",
            namespace="server",
            hostname=SVC_HOST,
            addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(self.ip["vip"]).packed)],
            ports=[wpb.Port(service_port=SERVICE_PORT, target_port=ECHO_PORT)],
        )
        self.n1 = Agent("n1", self.store, self.certs)
        self.n2 = Agent("n2", self.store, self.certs)
        self.servers: list[asyncio.Server] = []

    def identity(self, pod: str) -> Identity:
        wl = self.workloads[pod]
        return Identity(TD, wl.namespace, wl.service_account)

    async def start(self) -> None:
        put_addresses(self.store, [*self.workloads.values(), self.service])
        for pod in ("echo-1", "echo-2", "legacy"):
            self.servers.append(await echo_server(self.ip[pod], ECHO_PORT))
        self.n2.serve_hbone(self.ip["echo-1"])

    async def close(self) -> None:
        await self.n1.close()
        await self.n2.close()
        for s in self.servers:
            s.close()

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def settled(self, limit: float = 20.0) -> None:
        """Wait until both agents have finished every connection record (a client can see EOF a moment before
        the agent's relay returns and writes its metrics and log line)."""
        for _ in range(int(limit / 0.02)):
            if all(sample_value(a.metrics, "istio_tcp_sockets_open") == 0 for a in (self.n1, self.n2)):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("connections still open in the agents")

    def set_policies(self, *policies: apb.Authorization, selector: dict[str, list[str]] | None = None) -> None:
        """Replace all policies; `selector` maps pod -> names of WORKLOAD_SELECTOR policies attached to it."""
        for pod, names in (selector or {}).items():
            self.workloads[pod].ClearField("authorization_policies")
            self.workloads[pod].authorization_policies.extend(names)
        put_addresses(self.store, list(self.workloads.values()))
        put_policies(self.store, list(policies))


def put_addresses(store: WorkloadStore, msgs: list[Any]) -> None:
    store.put(msgs)


def put_policies(store: WorkloadStore, policies: list[apb.Authorization]) -> None:
    """Replace the store's policies with `policies`, as an xDS delta would."""
    keep = {policy_key(p) for p in policies}
    store.apply(
        AUTHORIZATION_TYPE, {}, removed=[policy_key(p) for p in store.all_policies() if policy_key(p) not in keep]
    )
    store.put(policies=policies)
