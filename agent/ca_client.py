"""gRPC client of the controller's ``IstioCertificateService`` (as ztunnel's caclient).

TLS to port 15012 verified against the controller's root (``--root-cert``) plus the bundle learned from earlier
responses, so the channel keeps verifying across a root rotation; plaintext only for the lab's 15010 when no root
is configured. The bearer token is re-read for every call because projected tokens are rotated by the kubelet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf import struct_pb2

from api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from common.log import kv
from common.spiffe import Identity

log = logging.getLogger("ambit.ca_client")

# Every controller serving certificate carries this DNS name, so the agent can dial the controller by any address.
DEFAULT_SERVER_NAME = "ambit-controller"


class CaRequestError(Exception):
    """The CA call failed; ``reason`` is a metrics label (the gRPC status name, lower case)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CertificateSigner(Protocol):
    async def create_certificate(self, csr_pem: str, identity: Identity, ttl_seconds: int) -> list[str]: ...

    def update_roots(self, roots_pem: Sequence[str]) -> None: ...


class CaClient:
    def __init__(
        self,
        address: str,
        *,
        token_file: Path | str | None = None,
        root_cert_file: Path | str | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.token_file = Path(token_file) if token_file else None
        self.root_cert_file = Path(root_cert_file) if root_cert_file else None
        self.server_name = server_name
        self.timeout = timeout
        self._learned_roots: tuple[str, ...] = ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.IstioCertificateServiceStub | None = None
        self._stale: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task[None]] = set()

    def _trust(self) -> bytes:
        pems = list(self._learned_roots)
        if self.root_cert_file is not None:
            try:
                pems.insert(0, self.root_cert_file.read_text())
            except OSError as e:
                if not pems:
                    raise CaRequestError("no_root_cert", f"{self.root_cert_file}: {e.strerror}") from None
                log.warning("root certificate file unreadable; using the learned bundle", extra=kv(error=str(e)))
        return "".join(p if p.endswith("\n") else p + "\n" for p in pems).encode()

    def _stub_for_call(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        if self._stub is None:
            if self.root_cert_file is None:
                self._channel = grpc.aio.insecure_channel(self.address)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=self._trust())
                options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
                self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        return self._stub

    def _drop_channel(self) -> None:
        """The next call builds a new channel; the old one is closed from async code (update_roots is sync)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            self._stale.append(channel)

    def update_roots(self, roots_pem: Sequence[str]) -> None:
        """Trust what the CA says the bundle is, from now on, for the channel to the CA itself."""
        roots = tuple(roots_pem)
        if roots != self._learned_roots:
            self._learned_roots = roots
            if self.root_cert_file is not None:
                self._drop_channel()

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
        await self._close_dropped()
        stub = self._stub_for_call()
        try:
            response = await stub.CreateCertificate(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                # Maybe the controller now presents a certificate from a root we only have on disk: re-read it.
                self._drop_channel()
            raise CaRequestError(e.code().name.lower(), f"{e.code().name}: {e.details()}") from None
        return list(response.cert_chain)

    async def _close_dropped(self) -> None:
        """Close replaced channels, letting calls still running on them finish (up to the call timeout)."""
        stale, self._stale = self._stale, []
        for channel in stale:
            task = asyncio.create_task(channel.close(self.timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self._drop_channel()
        await self._close_dropped()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
