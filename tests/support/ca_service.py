"""The controller's CA service run in the test's own loop, over real gRPC TLS on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from agent import controller_channel
from controller.ca import CertificateAuthority
from controller.ca_service import add_to_server, server_credentials
from controller.node_auth import NodeTokenAuthenticator


class AllPods:
    """A pod index in which every node runs a pod of every service account: authorization always passes."""

    def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return True


@contextlib.asynccontextmanager
async def ca_service(ca: CertificateAuthority, workdir: Path) -> AsyncIterator[tuple[str, Path]]:
    """Serves ``ca`` to node ``node1``; yields the address and the file holding node1's token."""
    tokens = workdir / "tokens.json"
    tokens.write_text('{"node1": "secret"}')
    token_file = workdir / "token"
    token_file.write_text("secret")
    server = grpc.aio.server()
    add_to_server(server, ca, AllPods(), NodeTokenAuthenticator(tokens), CollectorRegistry())
    port = server.add_secure_port("127.0.0.1:0", server_credentials(ca))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", token_file
    finally:
        await server.stop(None)


def count_controller_connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The TCP connections the agent's controller channel opens from now on (host, port), in order."""
    connects: list[tuple[str, int]] = []
    real_connect = controller_channel._tcp_connect

    async def counting_connect(host: str, port: int, limit: float) -> socket.socket:
        connects.append((host, port))
        return await real_connect(host, port, limit)

    monkeypatch.setattr(controller_channel, "_tcp_connect", counting_connect)
    return connects
