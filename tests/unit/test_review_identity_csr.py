"""Malformed CSR bytes are the caller's mistake: INVALID_ARGUMENT naming the csr field, never an internal error."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from api.istio.v1.auth import ca_pb2
from controller.ca import CertificateAuthority, CsrError, parse_csr
from controller.ca_service import CertificateService
from controller.node_auth import NodeTokenAuthenticator
from tests.support.identity_pki import csr_pem

ID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
PRIME256V1 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7


def _mutated(old: bytes, new: bytes) -> str:
    """A well-formed CSR with one DER field replaced (same length, so the encoding stays valid)."""
    der = x509.load_pem_x509_csr(csr_pem().encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1 and len(old) == len(new)
    body = base64.encodebytes(der.replace(old, new)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


MALFORMED = {
    # CertificationRequestInfo.version is 0; anything else is no PKCS#10 request.
    "version_97": _mutated(bytes.fromhex("3062020100"), bytes.fromhex("3062020161")),
    # A public key algorithm OpenSSL does not know (id-ecPublicKey's last arc changed).
    "unknown_key_algorithm": _mutated(ID_EC_PUBLIC_KEY, ID_EC_PUBLIC_KEY[:-1] + b"\x09"),
    # An EC key on a named curve nobody implements (prime256v1's last arc changed).
    "unknown_curve": _mutated(PRIME256V1, PRIME256V1[:-1] + b"\x63"),
}


class Pods:
    def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return (node, namespace, service_account) == ("node1", "default", "web")


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class Context:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer secret-1"),)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_csr_is_a_csr_error(name: str) -> None:
    with pytest.raises(CsrError) as exc:
        parse_csr(MALFORMED[name])
    assert exc.value.reason == "bad_csr"


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_csr_is_invalid_argument_not_internal(tmp_path: Path, name: str) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"node1": "secret-1"}))
    service = CertificateService(
        CertificateAuthority(tmp_path / "ca", "cluster.local"),
        Pods(),
        NodeTokenAuthenticator(tokens),
        CollectorRegistry(),
    )
    md = struct_pb2.Struct()
    md["ImpersonatedIdentity"] = "spiffe://cluster.local/ns/default/sa/web"
    req = ca_pb2.IstioCertificateRequest(csr=MALFORMED[name], validity_duration=3600, metadata=md)
    with pytest.raises(Aborted, match="csr: ") as exc:
        await service.CreateCertificate(req, Context())  # type: ignore[arg-type]
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
