"""Certificates whose PEM armour and outer DER are fine but whose fields are not (cryptography parses those lazily,
so the error surfaces at first use): in the CA directory, in the CA Secret and in a CA reply, each is refused with
an error naming where it came from, and the last good state keeps serving."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client as k8s

from agent.identity import InvalidCertificateResponse, new_key_and_csr, parse_response
from common.pki import PemError, load_pem_certs
from common.spiffe import Identity
from controller.ca import CaLoadError, CertificateAuthority, new_root
from controller.ca_secret import CaSecret, CaSecretError
from tests.support.fake_kube import serve
from tests.support.fake_kube_identity import install_objects
from tests.support.identity_pki import csr_pem

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
PRIME256V1 = bytes.fromhex("06082a8648ce3d030107")


def _rewrite(pem: str | bytes, old: bytes, new: bytes) -> bytes:
    der = x509.load_pem_x509_certificate(pem if isinstance(pem, bytes) else pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert old in der and len(old) == len(new)
    body = base64.encodebytes(der.replace(old, new)).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n".encode()


def broken_names(pem: str | bytes) -> bytes:
    """The trust domain's UTF8String in subject and issuer re-tagged as a BOOLEAN: the names do not parse."""
    td = TD.encode()
    return _rewrite(pem, b"\x0c" + bytes([len(td)]) + td, b"\x01" + bytes([len(td)]) + td)


def unknown_curve(pem: str | bytes) -> bytes:
    """The public key on a named curve nobody implements."""
    return _rewrite(pem, PRIME256V1, PRIME256V1[:-1] + b"\x63")


CORRUPTIONS: dict[str, Callable[[str | bytes], bytes]] = {"broken_names": broken_names, "unknown_curve": unknown_curve}


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_load_pem_certs_names_the_source(corrupt: str) -> None:
    root, _ = new_root(TD)
    with pytest.raises(PemError, match=r"^bundle\.pem: certificate 1 is malformed: "):
        load_pem_certs(CORRUPTIONS[corrupt](root.public_bytes(serialization.Encoding.PEM)), "bundle.pem")


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
@pytest.mark.parametrize("file", ["ca-cert.pem", "root-cert.pem"])
def test_running_ca_keeps_signing_when_a_file_is_corrupted(tmp_path: Path, corrupt: str, file: str) -> None:
    d = tmp_path / "ca"
    ca = CertificateAuthority(d, TD)
    before = ca.roots_pem()
    (d / file).write_bytes(CORRUPTIONS[corrupt]((d / file).read_bytes()))
    assert not ca.reload_if_changed(force=True)
    chain = ca.sign_csr(csr_pem(), WEB, 60)
    assert chain[-1] == before[-1]


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupted_ca_cert_at_start_is_a_load_error_naming_the_file(tmp_path: Path, corrupt: str) -> None:
    d = tmp_path / "ca"
    CertificateAuthority(d, TD)
    (d / "ca-cert.pem").write_bytes(CORRUPTIONS[corrupt]((d / "ca-cert.pem").read_bytes()))
    with pytest.raises(CaLoadError, match=f"{d}/ca-cert.pem: "):
        CertificateAuthority(d, TD)


@pytest.fixture
def api() -> Iterator[tuple[Any, Any]]:
    with serve() as fake:
        secrets = install_objects(fake, "secrets", "Secret")
        install_objects(fake, "configmaps", "ConfigMap")
        config = k8s.Configuration()
        config.host = fake.url
        yield secrets, k8s.ApiClient(config)


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupted_certificate_in_the_secret_is_a_secret_error(
    api: tuple[Any, Any], tmp_path: Path, corrupt: str
) -> None:
    """Not a ValueError escaping sync(): the periodic sync task catches CaSecretError and would die of anything
    else, leaving the replica on its last copy for good."""
    secrets, client = api
    mirror = CaSecret(client, "istio-system", "istio-ca-secret", tmp_path / "ca", TD)
    mirror.sync()
    data = secrets.items[("istio-system", "istio-ca-secret")]["data"]
    data["root-cert.pem"] = base64.b64encode(CORRUPTIONS[corrupt](base64.b64decode(data["root-cert.pem"]))).decode()
    with pytest.raises(CaSecretError, match=r"istio-system/istio-ca-secret: data\[root-cert.pem\]"):
        mirror.sync()


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_agent_refuses_a_reply_with_a_corrupted_certificate(tmp_path: Path, corrupt: str) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    key, csr = new_key_and_csr(WEB)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    chain = ca.sign_csr(csr, WEB, 600)
    bad = [*chain[:-1], CORRUPTIONS[corrupt](chain[-1]).decode()]
    with pytest.raises(InvalidCertificateResponse):
        parse_response(bad, WEB, key, time.time())
