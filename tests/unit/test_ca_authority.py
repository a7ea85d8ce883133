"""controller/ca.py: CSR validation, SAN and TTL policy, chain order, persistence and plug-in layout."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common.pki import cert_pem, is_self_signed, issued_by, path_to_root
from common.spiffe import Identity
from controller import ca as ca_module
from controller.ca import (
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    CaExpiredError,
    CaLoadError,
    CertificateAuthority,
    CsrError,
    IdentityError,
    TtlError,
)
from tests.support.identity_pki import csr_pem, rsa_csr_pem, tampered_csr_pem, write_plugged_ca

WEB = Identity("cluster.local", "default", "web")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca", "cluster.local")


def _certs(chain: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in chain]


def _uris(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def test_first_start_creates_p256_root_with_private_key_file(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    root = x509.load_pem_x509_certificate(ca.roots_pem()[0].encode())
    assert is_self_signed(root)
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca-key.pem").st_mode) == 0o600
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")], "temp files left behind"


def test_restart_with_same_dir_keeps_root(tmp_path: Path) -> None:
    first = CertificateAuthority(tmp_path / "ca", "cluster.local").roots_pem()
    again = CertificateAuthority(tmp_path / "ca", "cluster.local").roots_pem()
    assert first == again
    other = CertificateAuthority(tmp_path / "other", "cluster.local").roots_pem()
    assert other != first


def test_partial_ca_dir_is_refused_not_overwritten(tmp_path: Path) -> None:
    CertificateAuthority(tmp_path / "ca", "cluster.local")
    (tmp_path / "ca" / "ca-cert.pem").unlink()
    key_before = (tmp_path / "ca" / "ca-key.pem").read_bytes()
    with pytest.raises(CaLoadError, match=r"ca-cert\.pem"):
        CertificateAuthority(tmp_path / "ca", "cluster.local")
    assert (tmp_path / "ca" / "ca-key.pem").read_bytes() == key_before


def test_san_is_set_by_ca_not_by_csr(ca: CertificateAuthority) -> None:
    chain = ca.sign_csr(csr_pem(uri="spiffe://evil.example/ns/kube-system/sa/admin", cn="admin"), WEB, 0)
    leaf = _certs(chain)[0]
    assert _uris(leaf) == [str(WEB)]
    assert leaf.subject == x509.Name([])
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_chain_order_leaf_first_root_last(ca: CertificateAuthority) -> None:
    certs = _certs(ca.sign_csr(csr_pem(), WEB, 3600))
    assert len(certs) == 2
    leaf, root = certs
    assert is_self_signed(root) and not is_self_signed(leaf)
    assert issued_by(leaf, root)
    assert cert_pem(root) == ca.roots_pem()[-1]


def test_plugged_in_intermediate_chain_leaf_to_root(tmp_path: Path) -> None:
    root, inter = write_plugged_ca(tmp_path / "ca")
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    certs = _certs(ca.sign_csr(csr_pem(), WEB, 3600))
    assert [c.subject for c in certs[1:]] == [inter.subject, root.subject]
    assert issued_by(certs[0], inter) and issued_by(inter, root)
    assert path_to_root(certs[0], certs[1:-1], [certs[-1]]) is not None
    assert ca.roots_pem() and "BEGIN CERTIFICATE" in ca.roots_pem()[0]


def test_plugged_in_key_mismatch_names_the_file(tmp_path: Path) -> None:
    write_plugged_ca(tmp_path / "ca")
    other = tmp_path / "other"
    write_plugged_ca(other)
    (tmp_path / "ca" / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    with pytest.raises(CaLoadError, match=r"ca-key\.pem: key does not match"):
        CertificateAuthority(tmp_path / "ca", "cluster.local")


def test_plugged_in_chain_to_unknown_root_refused(tmp_path: Path) -> None:
    write_plugged_ca(tmp_path / "ca")
    other = tmp_path / "other"
    write_plugged_ca(other)
    (tmp_path / "ca" / "root-cert.pem").write_bytes((other / "root-cert.pem").read_bytes())
    (tmp_path / "ca" / "cert-chain.pem").write_bytes((tmp_path / "ca" / "ca-cert.pem").read_bytes())
    with pytest.raises(CaLoadError, match="no chain"):
        CertificateAuthority(tmp_path / "ca", "cluster.local")


@pytest.mark.parametrize("ttl", [0, -5])
def test_ttl_default_when_not_positive(ca: CertificateAuthority, ttl: int) -> None:
    leaf = _certs(ca.sign_csr(csr_pem(), WEB, ttl))[0]
    remaining = (leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).total_seconds()
    assert DEFAULT_TTL_SECONDS - 30 < remaining <= DEFAULT_TTL_SECONDS


def test_ttl_requested_is_honoured_and_not_before_backdated(ca: CertificateAuthority) -> None:
    now = datetime.datetime.now(datetime.UTC)
    leaf = _certs(ca.sign_csr(csr_pem(), WEB, 120))[0]
    assert 90 < (leaf.not_valid_after_utc - now).total_seconds() <= 121
    assert leaf.not_valid_before_utc < now - datetime.timedelta(seconds=10)


def test_ttl_limit(ca: CertificateAuthority) -> None:
    ca.sign_csr(csr_pem(), WEB, MAX_TTL_SECONDS)
    with pytest.raises(TtlError, match="exceeds the maximum"):
        ca.sign_csr(csr_pem(), WEB, MAX_TTL_SECONDS + 1)
    with pytest.raises(TtlError):
        ca.sign_csr(csr_pem(), WEB, 2**62)


@pytest.mark.parametrize(
    ("csr", "reason", "message"),
    [
        ("garbage", "bad_csr", "not a PEM-encoded PKCS#10"),
        ("", "bad_csr", "not a PEM"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "bad_csr", "PKCS#10"),
        ("x" * 70000, "bad_csr", "at most"),
    ],
)
def test_garbage_csr_refused(ca: CertificateAuthority, csr: str, reason: str, message: str) -> None:
    with pytest.raises(CsrError, match=message) as exc:
        ca.sign_csr(csr, WEB, 0)
    assert exc.value.reason == reason


def test_rsa_csr_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="RSA-2048; only ECDSA P-256") as exc:
        ca.sign_csr(rsa_csr_pem(), WEB, 0)
    assert exc.value.reason == "bad_key_type"


def test_p384_csr_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="secp384r1") as exc:
        ca.sign_csr(csr_pem(ec.generate_private_key(ec.SECP384R1())), WEB, 0)
    assert exc.value.reason == "bad_key_type"


def test_wrong_signature_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="signature") as exc:
        ca.sign_csr(tampered_csr_pem(), WEB, 0)
    assert exc.value.reason == "bad_csr_signature"


def test_foreign_trust_domain_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match="trust domain"):
        ca.sign_csr(csr_pem(), Identity("evil.example", "default", "web"), 0)


def test_expired_signing_ca_is_refused_by_name(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA that expires while serving used to fail inside the certificate builder (ValueError: not_after before
    not_before), which the CA service reported as an internal error with a traceback per request."""
    expired_at = _certs(ca.roots_pem())[0].not_valid_after_utc
    monkeypatch.setattr(ca_module, "_now", lambda: expired_at + datetime.timedelta(minutes=5))
    with pytest.raises(CaExpiredError, match=r"ca-cert.pem: the signing CA expired at .*rotate it"):
        ca.sign_csr(csr_pem(), WEB, 3600)


def test_serving_certificate_has_dns_and_ip_sans(ca: CertificateAuthority) -> None:
    pair = ca.issue_serving_certificate(["ambit-controller"], ["127.0.0.1", "10.0.0.1"], 3600)
    leaf = _certs(pair.chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ambit-controller"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.1"]
    assert "PRIVATE KEY" in pair.key_pem
