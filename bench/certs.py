"""Per-run certificates for the reference proxies (Envoy pair, Python TLS relay pair).

Shaped like istiod workload certificates (ECDSA P-256, empty subject, one critical URI SAN with the SPIFFE ID,
serverAuth + clientAuth), so the reference pair does the same TLS work as a mesh would. Ambit's own agents get
their certificates from the controller's CA; these are only for the comparison proxies.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.spiffe import Identity

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = Identity(TRUST_DOMAIN, "bench", "client")
SERVER_ID = Identity(TRUST_DOMAIN, "bench", "server")


@dataclass(frozen=True)
class CertFiles:
    root: Path
    client_cert: Path
    client_key: Path
    server_cert: Path
    server_key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


def _leaf(
    ident: Identity, ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, now: datetime.datetime
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(ident))]), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def generate(out_dir: Path) -> CertFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN), x509.NameAttribute(NameOID.COMMON_NAME, "bench")]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(
        root=out_dir / "root.crt",
        client_cert=out_dir / "client.crt",
        client_key=out_dir / "client.key",
        server_cert=out_dir / "server.crt",
        server_key=out_dir / "server.key",
    )
    files.root.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for ident, cert_path, key_path in (
        (CLIENT_ID, files.client_cert, files.client_key),
        (SERVER_ID, files.server_cert, files.server_key),
    ):
        cert_pem, key_pem = _leaf(ident, ca_key, ca_name, now)
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
    return files
