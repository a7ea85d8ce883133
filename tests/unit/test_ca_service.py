"""CreateCertificate decisions: authentication, impersonated identity, node authorization, codes and counters."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from api.istio.v1.auth import ca_pb2
from controller.ca import CertificateAuthority
from controller.ca_service import CertificateService
from controller.node_auth import (
    AuthBackendError,
    AuthenticationError,
    Caller,
    FirstMatchAuthenticator,
    NodeTokenAuthenticator,
    UntrustedCallerError,
)
from tests.support.identity_pki import csr_pem, rsa_csr_pem, tampered_csr_pem

WEB = "spiffe://cluster.local/ns/default/sa/web"


class Pods:
    """node1 runs default/web, node2 runs default/db."""

    placed = {("node1", "default", "web"), ("node2", "default", "db")}

    def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return (node, namespace, service_account) in self.placed


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"node1": "secret-1", "node2": "secret-2"}))
    return path


@pytest.fixture
def service(tmp_path: Path, tokens: Path) -> CertificateService:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    return CertificateService(ca, Pods(), NodeTokenAuthenticator(tokens), CollectorRegistry())


def request(csr: str | None = None, identity: Any = WEB, ttl: int = 3600) -> ca_pb2.IstioCertificateRequest:
    req = ca_pb2.IstioCertificateRequest(csr=csr if csr is not None else csr_pem(), validity_duration=ttl)
    if identity is not None:
        md = struct_pb2.Struct()
        md["ImpersonatedIdentity"] = identity
        req.metadata.CopyFrom(md)
    return req


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def call(service: CertificateService, req: ca_pb2.IstioCertificateRequest, md: Any) -> Any:
    return await service.CreateCertificate(req, FakeContext(md))  # type: ignore[arg-type]


def count(service: CertificateService, result: str, reason: str) -> float:
    for metric in service.requests.collect():
        for sample in metric.samples:
            if sample.name == "ambit_ca_requests_total" and sample.labels == {"result": result, "reason": reason}:
                return sample.value
    return 0.0


async def test_own_workload_granted(service: CertificateService) -> None:
    resp = await call(
        service, request(csr_pem(uri="spiffe://cluster.local/ns/kube-system/sa/admin")), bearer("secret-1")
    )
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert len(resp.cert_chain) == 2
    assert count(service, "granted", "ok") == 1


@pytest.mark.parametrize(
    ("md", "code", "reason", "text"),
    [
        ([], grpc.StatusCode.UNAUTHENTICATED, "no_credentials", "no credentials"),
        ([("authorization", "Basic abc")], grpc.StatusCode.UNAUTHENTICATED, "no_credentials", "Bearer"),
        (bearer("nope"), grpc.StatusCode.UNAUTHENTICATED, "bad_token", "does not match"),
        (bearer("secret-2"), grpc.StatusCode.PERMISSION_DENIED, "not_on_node", "node node2 runs no pod"),
    ],
)
async def test_caller_refusals(
    service: CertificateService, md: Any, code: grpc.StatusCode, reason: str, text: str
) -> None:
    with pytest.raises(Aborted, match=text) as exc:
        await call(service, request(), md)
    assert exc.value.code == code
    assert count(service, "refused", reason) == 1
    assert count(service, "granted", "ok") == 0


@pytest.mark.parametrize(
    ("req", "reason", "text"),
    [
        (request(identity=None), "missing_identity", "ImpersonatedIdentity is required"),
        (request(identity="web"), "bad_identity", "not a SPIFFE ID"),
        (request(identity="spiffe://cluster.local/web"), "bad_identity", "expected spiffe://"),
        (request(identity=42.0), "bad_identity", "must be a string"),
        (request(identity="spiffe://other.td/ns/default/sa/web"), "foreign_trust_domain", "trust domain"),
        (request(ttl=10**12), "ttl_too_large", "exceeds the maximum"),
        (request(csr="garbage"), "bad_csr", "csr: not a PEM"),
        (request(csr=rsa_csr_pem()), "bad_key_type", "RSA-2048"),
        (request(csr=tampered_csr_pem()), "bad_csr_signature", "signature"),
    ],
)
async def test_bad_input_invalid_argument(
    service: CertificateService, req: ca_pb2.IstioCertificateRequest, reason: str, text: str
) -> None:
    with pytest.raises(Aborted, match=text) as exc:
        await call(service, req, bearer("secret-1"))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert count(service, "refused", reason) == 1


async def test_authorization_checked_before_csr(service: CertificateService) -> None:
    """A caller asking for another node's workload learns nothing about CSR validity (and costs no crypto)."""
    with pytest.raises(Aborted) as exc:
        await call(
            service, request(csr="garbage", identity="spiffe://cluster.local/ns/default/sa/db"), bearer("secret-1")
        )
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED


class Raising:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def authenticate(self, metadata: Any) -> Caller:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "result"),
    [
        (
            UntrustedCallerError("service account default/x is not a trusted node agent account"),
            grpc.StatusCode.PERMISSION_DENIED,
            "refused",
        ),
        (AuthBackendError("token review failed: HTTP 500"), grpc.StatusCode.UNAVAILABLE, "error"),
    ],
)
async def test_authenticator_failure_codes(
    tmp_path: Path, error: Exception, code: grpc.StatusCode, result: str
) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    service = CertificateService(ca, Pods(), Raising(error), CollectorRegistry())
    with pytest.raises(Aborted) as exc:
        await call(service, request(), bearer("x"))
    assert exc.value.code == code
    assert exc.value.details == str(error)
    assert count(service, result, getattr(error, "reason", "")) == 1


async def test_first_match_authenticator_tries_each(tokens: Path) -> None:
    auth = FirstMatchAuthenticator([Raising(AuthenticationError("x")), NodeTokenAuthenticator(tokens)])
    assert (await auth.authenticate(bearer("secret-2"))).node == "node2"


async def test_pod_index_crash_is_internal_not_fatal(tmp_path: Path, tokens: Path) -> None:
    class Broken:
        def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
            raise RuntimeError("boom")

    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    service = CertificateService(ca, Broken(), NodeTokenAuthenticator(tokens), CollectorRegistry())
    with pytest.raises(Aborted) as exc:
        await call(service, request(), bearer("secret-1"))
    assert exc.value.code == grpc.StatusCode.INTERNAL
    assert "boom" not in exc.value.details
    assert count(service, "error", "internal") == 1


def test_root_expiry_exported(tmp_path: Path, tokens: Path) -> None:
    registry = CollectorRegistry()
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    CertificateService(ca, Pods(), NodeTokenAuthenticator(tokens), registry)
    root = x509.load_pem_x509_certificate(ca.roots_pem()[0].encode())
    exported = registry.get_sample_value("citadel_server_root_cert_expiry_timestamp")
    assert exported == root.not_valid_after_utc.timestamp()
