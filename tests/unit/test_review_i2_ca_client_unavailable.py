"""A controller that answers the CA's UNAVAILABLE (its TokenReview backend is down) over a working TLS connection
keeps that connection: each retry used to open a new TCP and TLS connection to the controller."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from agent.ca_client import CaClient, CaRequestError
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from controller.ca_service import add_to_server, server_credentials
from controller.node_auth import AuthBackendError, Caller
from tests.support.ca_service import AllPods, count_controller_connects
from tests.support.identity_pki import csr_pem

TD = "cluster.local"
WEB = Identity(TD, "default", "web")


class FlakyBackend:
    """Refuses as UNAVAILABLE while ``down`` (the API server it would ask is failing), else accepts node1."""

    def __init__(self) -> None:
        self.down = True

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Caller:
        if self.down:
            raise AuthBackendError("token review failed: HTTP 503 Service Unavailable")
        return Caller(node="node1", subject="node node1")


async def test_an_unavailable_answer_keeps_the_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    connects = count_controller_connects(monkeypatch)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    backend = FlakyBackend()
    server = grpc.aio.server()
    add_to_server(server, ca, AllPods(), backend, CollectorRegistry())
    port = server.add_secure_port("127.0.0.1:0", server_credentials(ca))
    await server.start()
    token = tmp_path / "token"
    token.write_text("secret")
    client = CaClient(f"127.0.0.1:{port}", token_file=token, root_cert_file=tmp_path / "ca" / "root-cert.pem")
    try:
        for _ in range(3):
            with pytest.raises(CaRequestError) as exc:
                await client.create_certificate(csr_pem(), WEB, 3600)
            assert exc.value.reason == "unavailable"
        backend.down = False
        chain = await client.create_certificate(csr_pem(), WEB, 3600)
        assert len(chain) == 2
        assert len(connects) == 1, f"one connection for every call, got {len(connects)}"
    finally:
        await client.close()
        await server.stop(None)
