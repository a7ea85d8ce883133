"""Harness for identity integration tests: the real `ambit-controller` process on 127.0.0.1, agents' certificate
managers talking to it over gRPC TLS, and real TLS handshakes between their contexts."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agent.ca_client import CaClient
from agent.identity import Backoff, CertificateManager
from agent.prometheus import Registry
from common import tls
from common.spiffe import Identity
from tests.support.xds_controller import free_port, metric_sum

TD = "cluster.local"
START_TIMEOUT = 30.0


@dataclass
class Placement:
    """Which (node, namespace, service account) pods exist: written as the controller's config."""

    pods: set[tuple[str, str, str]] = field(default_factory=set)


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


class ControllerProcess:
    """`ambit-controller --config-dir ... --ca-dir ... --node-tokens ...` with only the TLS gRPC port open.

    Process control is synchronous (usable from module-scoped fixtures); the async wrappers run it in a thread so
    an agent's event loop keeps going while the controller restarts.
    """

    def __init__(
        self,
        workdir: Path,
        placement: Placement,
        tokens: dict[str, str],
        *,
        kubeconfig: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """Config from ``placement`` written as a config dir, or (``kubeconfig``) from a Kubernetes API server."""
        self.workdir = workdir
        self.ca_dir = workdir / "ca"
        self.tokens_file = workdir / "node-tokens.json"
        self.tokens_file.write_text(json.dumps(tokens))
        for node, token in tokens.items():
            (workdir / f"{node}.token").write_text(token + "\n")
        if kubeconfig is None:
            write_cluster(workdir / "config", placement)
            self.source = ["--config-dir", str(workdir / "config"), "--node-tokens", str(self.tokens_file)]
        else:
            self.source = ["--kube", "--kubeconfig", str(kubeconfig)]
        self.source += extra_args
        self.port = 0
        self.monitoring_port = 0
        self.log = workdir / "controller.log"
        self._proc: subprocess.Popen[bytes] | None = None

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

    def _argv(self) -> list[str]:
        return [
            str(Path(sys.executable).parent / "ambit-controller"),
            *self.source,
            "--ca-dir", str(self.ca_dir),
            "--trust-domain", TD,
            "--listen-address", "127.0.0.1",
            "--xds-port", "0",
            "--tls-port", str(self.port),
            "--monitoring-port", str(self.monitoring_port),
            "--event-loop", "asyncio",
        ]  # fmt: skip

    def start_sync(self) -> None:
        """Start and wait until the TLS port accepts; a first start retries on ports taken in the meantime."""
        first = self.port == 0
        for _ in range(3 if first else 1):
            if first:
                self.port, self.monitoring_port = free_port(), free_port()
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(self._argv(), stdout=log, stderr=log)
            deadline = time.monotonic() + START_TIMEOUT
            while self._proc.poll() is None and time.monotonic() < deadline:
                if self.root_cert.exists() and self._accepting():
                    if not self.agent_root_cert.exists():
                        self.agent_root_cert.write_text(self.root_cert.read_text())
                    return
                time.sleep(0.05)
            self.stop_sync()
        raise RuntimeError(f"ambit-controller did not start; log {self.log}:\n{self.log.read_text()[-3000:]}")

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop_sync(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def requests(self, result: str, reason: str) -> float:
        """ambit_ca_requests_total{result,reason} scraped from the controller's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitoring_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return metric_sum(text, "ambit_ca_requests_total", result=result, reason=reason)

    def client(self, node: str, *, token_file: Path | None = None) -> CaClient:
        return CaClient(
            self.address,
            token_file=token_file or self.workdir / f"{node}.token",
            root_cert_file=self.agent_root_cert,
            timeout=5.0,
        )

    def manager(self, node: str, ttl_seconds: int = 3600) -> tuple[CertificateManager, CaClient]:
        client = self.client(node)
        backoff = Backoff(initial=0.1, maximum=1.0)
        m = CertificateManager(client, TD, ttl_seconds=ttl_seconds, registry=Registry(), backoff=backoff)
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
