"""The CA's two expiry horizons come from one place (CaMaterial): what a leaf chains through (chain_expiry, what
leaves are cut to) and that plus every bundled root (earliest_expiry, istiod's root-cert expiry gauge). Pins their
values across the layouts that make them differ."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.pki import cert_pem
from controller.ca import CertificateAuthority, key_pem

TD = "cluster.local"
NOW = datetime.datetime.now(datetime.UTC)


def _cert(
    name: str,
    days: int,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )


def _days(ts: float) -> int:
    return round((ts - NOW.timestamp()) / 86400)


def plugged(directory: Path, root_days: int, inter_days: int | None, other_root_days: int | None) -> None:
    """ca-cert is an intermediate (or the root itself when ``inter_days`` is None); the bundle may hold another
    root, as during a rotation."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("root", root_days, root_key, None)
    bundle = cert_pem(root)
    if other_root_days is not None:
        other_key = ec.generate_private_key(ec.SECP256R1())
        bundle += cert_pem(_cert("other root", other_root_days, other_key, None))
    directory.mkdir(parents=True)
    if inter_days is None:
        (directory / "ca-cert.pem").write_text(cert_pem(root))
        (directory / "ca-key.pem").write_bytes(key_pem(root_key))
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        inter = _cert("intermediate", inter_days, key, (root, root_key))
        (directory / "ca-cert.pem").write_text(cert_pem(inter))
        (directory / "ca-key.pem").write_bytes(key_pem(key))
        (directory / "cert-chain.pem").write_text(cert_pem(inter) + cert_pem(root))
    (directory / "root-cert.pem").write_text(bundle)


@pytest.mark.parametrize(
    ("root_days", "inter_days", "other_root_days", "chain", "earliest"),
    [
        (300, None, None, 300, 300),  # a self-signed root alone
        (300, 30, None, 30, 30),  # the intermediate ends first
        (30, 300, None, 30, 30),  # the root ends first
        (300, 200, 100, 200, 100),  # another bundled root ends first: it counts for the bundle only
        (300, 200, 400, 200, 200),
        (300, None, 100, 300, 100),
    ],
)
def test_chain_and_earliest_expiry(
    tmp_path: Path, root_days: int, inter_days: int | None, other_root_days: int | None, chain: int, earliest: int
) -> None:
    plugged(tmp_path / "ca", root_days, inter_days, other_root_days)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    assert (_days(ca.chain_expiry()), _days(ca.earliest_expiry())) == (chain, earliest)
    m = ca._material
    assert ca.chain_expiry() == m.chain_not_after.timestamp()
    assert ca.earliest_expiry() == min(c.not_valid_after_utc.timestamp() for c in (m.cert, *m.intermediates, *m.roots))
