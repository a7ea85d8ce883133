"""A small test CA issuing istiod-shaped workload certificates (ECDSA P-256, empty subject, one critical SPIFFE
URI SAN, serverAuth+clientAuth), for mTLS tests that need real certificates but not the CA service.

Independent of controller.ca on purpose: HBONE and Envoy interop tests must not break when the CA changes.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import tls
from common.spiffe import Identity


@dataclass(frozen=True)
class Leaf:
    identity: Identity | None
    chain_pem: str  # leaf first, then the root
    key_pem: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class TestCA:
    """A self-signed root (``O=<trust domain>``) that signs leaves for any SPIFFE identity."""

    __test__ = False  # not a pytest test class

    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "ambit test root"),
            ]
        )
        self.root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM).decode()

    def identity(self, namespace: str, service_account: str) -> Identity:
        return Identity(self.trust_domain, namespace, service_account)

    def issue(self, ident: Identity | None, *, uri: str | None = None) -> Leaf:
        """A leaf for ``ident`` (or for a raw ``uri`` SAN, or with no SAN at all when both are None)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=12))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        san = uri or (str(ident) if ident is not None else None)
        if san is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=True
            )
        cert = builder.sign(self._key, hashes.SHA256())
        chain = cert.public_bytes(serialization.Encoding.PEM).decode() + self.root_pem
        return Leaf(ident, chain, _key_pem(key))

    def server_context(self, leaf: Leaf, roots: list[str] | None = None) -> ssl.SSLContext:
        return tls.server_context(leaf.chain_pem, leaf.key_pem, roots or [self.root_pem], alpn=[tls.ALPN_H2])

    def client_context(self, leaf: Leaf | None, roots: list[str] | None = None) -> ssl.SSLContext:
        if leaf is None:
            return tls.client_context(roots or [self.root_pem], alpn=[tls.ALPN_H2])
        return tls.client_context(roots or [self.root_pem], leaf.chain_pem, leaf.key_pem, alpn=[tls.ALPN_H2])

    def write(self, directory: Path, name: str, leaf: Leaf) -> tuple[Path, Path]:
        """Write ``<name>.crt`` (chain) and ``<name>.key`` for processes such as Envoy; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        crt, key = directory / f"{name}.crt", directory / f"{name}.key"
        crt.write_text(leaf.chain_pem)
        key.write_text(leaf.key_pem)
        key.chmod(0o600)
        return crt, key

    def write_root(self, directory: Path, name: str = "root") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.crt"
        path.write_text(self.root_pem)
        return path


Bios = tuple[ssl.MemoryBIO, ssl.MemoryBIO, ssl.MemoryBIO, ssl.MemoryBIO]
"""client in, client out, server in, server out"""


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, bios: Bios | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full handshake between two contexts over memory BIOs (``bios``, to go on exchanging records after)."""
    c_in, c_out, s_in, s_out = bios or (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    pending = [client, server]
    for _ in range(10):
        for obj in list(pending):
            try:
                obj.do_handshake()
                pending.remove(obj)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            return client, server
    raise AssertionError(f"handshake did not finish: {pending}")
