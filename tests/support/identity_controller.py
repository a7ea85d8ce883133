"""Harness for identity integration tests: a CA gRPC server on 127.0.0.1 over TLS, agents' managers, handshakes."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.ca_client import CaClient
from agent.identity import Backoff, CertificateManager
from common import tls
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from controller.ca_service import add_to_server, server_credentials
from controller.node_auth import NodeTokenAuthenticator

TD = "cluster.local"


@dataclass
class Placement:
    """Which (namespace, service account) runs on which node: the controller model's answer."""

    pods: set[tuple[str, str, str]] = field(default_factory=set)

    def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return (node, namespace, service_account) in self.pods


class CaController:
    """The controller's CA endpoint in this process: CertificateAuthority + CreateCertificate on a TLS port."""

    def __init__(self, workdir: Path, placement: Placement, tokens: dict[str, str]) -> None:
        self.workdir = workdir
        self.ca_dir = workdir / "ca"
        self.tokens_file = workdir / "node-tokens.json"
        self.tokens_file.write_text(json.dumps(tokens))
        for node, token in tokens.items():
            (workdir / f"{node}.token").write_text(token + "\n")
        self.placement = placement
        self.port = 0
        self.registry = CollectorRegistry()
        self.ca: CertificateAuthority | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root-cert.pem"

    @property
    def agent_root_cert(self) -> Path:
        """What agents were given as --root-cert at install time; deliberately not updated by rotations."""
        return self.workdir / "agent-root-cert.pem"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.registry = CollectorRegistry()
        self.ca = CertificateAuthority(self.ca_dir, TD)
        server = grpc.aio.server()
        add_to_server(server, self.ca, self.placement, NodeTokenAuthenticator(self.tokens_file), self.registry)
        self.port = server.add_secure_port(f"127.0.0.1:{self.port}", server_credentials(self.ca))
        await server.start()
        self._server = server
        if not self.agent_root_cert.exists():
            self.agent_root_cert.write_text(self.root_cert.read_text())

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    def requests(self, result: str, reason: str) -> float:
        return self.registry.get_sample_value("ambit_ca_requests_total", {"result": result, "reason": reason}) or 0.0

    def client(self, node: str, *, token_file: Path | None = None) -> CaClient:
        return CaClient(
            self.address,
            token_file=token_file or self.workdir / f"{node}.token",
            root_cert_file=self.agent_root_cert,
            timeout=5.0,
        )

    def manager(self, node: str, ttl_seconds: int = 3600, **kwargs: object) -> tuple[CertificateManager, CaClient]:
        client = self.client(node)
        backoff = Backoff(initial=0.1, maximum=1.0)
        m = CertificateManager(client, TD, ttl_seconds=ttl_seconds, registry=CollectorRegistry(), backoff=backoff)
        return m, client


async def tcp_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[Identity | None, Identity | None]:
    """Real TLS over 127.0.0.1: (client identity the server verified, server identity the client verified)."""
    seen_by_server: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(1)  # the client's certificate is verified by the time data arrives
            seen_by_server.set_result(tls.peer_identity(writer.get_extra_info("ssl_object")))
            writer.write(b"k")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            if not seen_by_server.done():
                seen_by_server.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        try:
            seen_by_client = tls.peer_identity(writer.get_extra_info("ssl_object"))
            writer.write(b"p")
            await writer.drain()
            await reader.readexactly(1)
        finally:
            writer.close()
        return await asyncio.wait_for(seen_by_server, 5), seen_by_client
    finally:
        server.close()
        await server.wait_closed()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_cluster(config_dir: Path, placement: Placement) -> None:
    """Namespaces, nodes and one pod per placement entry, in the YAML the controller's --config-dir reads."""
    config_dir.mkdir(parents=True, exist_ok=True)
    nodes = sorted({n for n, _, _ in placement.pods})
    namespaces = sorted({ns for _, ns, _ in placement.pods})
    docs: list[dict[str, object]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}},
        }
        for ns in namespaces
    ]
    for i, node in enumerate(nodes, start=1):
        docs.append(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "spec": {"podCIDR": f"10.244.{i}.0/24"}}
        )
    for j, (node, ns, sa) in enumerate(sorted(placement.pods), start=10):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{sa}-{j}", "namespace": ns, "labels": {"app": sa}},
                "spec": {"nodeName": node, "serviceAccountName": sa},
                "status": {"podIP": f"10.244.{nodes.index(node) + 1}.{j}"},
            }
        )
    (config_dir / "cluster.yaml").write_text(yaml.safe_dump_all(docs))


class ControllerProcess(CaController):
    """The real `ambit-controller` process, same interface as the in-process harness."""

    def __init__(self, workdir: Path, placement: Placement, tokens: dict[str, str]) -> None:
        super().__init__(workdir, placement, tokens)
        write_cluster(workdir / "config", placement)
        self.monitoring_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self.log = workdir / "controller.log"

    async def start(self) -> None:
        self.port = self.port or free_port()
        self.monitoring_port = self.monitoring_port or free_port()
        argv = [
            str(Path(sys.executable).parent / "ambit-controller"),
            "--config-dir", str(self.workdir / "config"),
            "--ca-dir", str(self.ca_dir),
            "--trust-domain", TD,
            "--node-tokens", str(self.tokens_file),
            "--xds-port", "0",
            "--tls-port", str(self.port),
            "--monitoring-port", str(self.monitoring_port),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not await self._serving():
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ambit-controller did not start; log {self.log}:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        if not self.agent_root_cert.exists():
            self.agent_root_cert.write_text(self.root_cert.read_text())

    async def _serving(self) -> bool:
        if not self.root_cert.exists():
            return False
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        return True

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def requests(self, result: str, reason: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitoring_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "ambit_ca_requests_total" and sample.labels == {"result": result, "reason": reason}:
                    return float(sample.value)
        return 0.0
