"""Client of the controller's ``IstioCertificateService`` (as ztunnel's caclient), over the agent's controller channel.

TLS to port 15012 verified against the controller's root (``--root-cert``) plus the bundle learned from earlier
responses, so the channel keeps verifying across a root rotation; plaintext only for the lab's 15010 when no root
is configured. The bearer token is re-read for every call because projected tokens are rotated by the kubelet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from google.protobuf import struct_pb2

from agent.controller_channel import DEFAULT_SERVER_NAME, ControllerChannel, RpcError
from api.istio.v1.auth import ca_pb2
from common.spiffe import Identity

log = logging.getLogger("ambit.ca_client")

CA_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


class CaRequestError(Exception):
    """The CA call failed; ``reason`` is a metrics label (the gRPC status name, lower case)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CertificateSigner(Protocol):
    async def create_certificate(self, csr_pem: str, identity: Identity, ttl_seconds: int) -> list[str]: ...

    def update_roots(self, roots_pem: Sequence[str]) -> None: ...


class CaClient:
    """``channel`` is the one the agent shares with its xDS client; without it the client makes its own."""

    def __init__(
        self,
        address: str,
        *,
        token_file: Path | str | None = None,
        root_cert_file: Path | str | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = 10.0,
        channel: ControllerChannel | None = None,
    ) -> None:
        self.address = address
        self.token_file = Path(token_file) if token_file else None
        self.timeout = timeout
        self._own_channel = channel is None
        self.channel = channel or ControllerChannel(address, root_cert_file=root_cert_file, server_name=server_name)

    @property
    def root_cert_file(self) -> Path | None:
        return self.channel.root_cert_file

    @root_cert_file.setter
    def root_cert_file(self, path: Path | None) -> None:
        """A new root file takes effect from the next connection to the controller."""
        self.channel.root_cert_file = path
        self.channel.retire()

    def update_roots(self, roots_pem: Sequence[str]) -> None:
        """Trust what the CA says the bundle is, from now on, for the channel to the CA itself."""
        self.channel.update_roots(roots_pem)

    def _metadata(self) -> list[tuple[str, str]]:
        if self.token_file is None:
            return []
        try:
            token = self.token_file.read_text().strip()
        except OSError as e:
            raise CaRequestError("no_token", f"{self.token_file}: {e.strerror}") from None
        return [("authorization", f"Bearer {token}")]

    async def create_certificate(self, csr_pem: str, identity: Identity, ttl_seconds: int) -> list[str]:
        metadata = struct_pb2.Struct()
        metadata["ImpersonatedIdentity"] = str(identity)
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds, metadata=metadata)
        try:
            response = await self.channel.unary(
                CA_METHOD, request, ca_pb2.IstioCertificateResponse, self._metadata(), self.timeout
            )
        except OSError as e:  # neither the root file nor a learned bundle to verify the controller with
            raise CaRequestError("no_root_cert", f"{self.channel.root_cert_file}: {e.strerror}") from None
        except RpcError as e:
            # The connection is kept whatever the status. One that failed (refused, or the controller's certificate
            # not verified) is gone already, and the next call connects afresh, re-reading the root file; one that
            # carried this answer works, and an UNAVAILABLE over it (the controller's TokenReview backend failing)
            # says nothing about its trust. Retired on every such answer, each retry of every identity paid the
            # controller a new TCP and TLS handshake, at the moment it was already in trouble.
            raise CaRequestError(e.code().name.lower(), f"{e.code().name}: {e.details()}") from None
        return list(response.cert_chain)

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()
