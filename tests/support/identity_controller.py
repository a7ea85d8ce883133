"""Harness for identity integration tests: a CA gRPC server on 127.0.0.1 over TLS, agents' managers, handshakes."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

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
