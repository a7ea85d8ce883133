"""Certificate material for identity tests: CSRs of various key types and a plugged-in CA in Istio's layout."""

from __future__ import annotations

import contextlib
import datetime
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from common import tls
from common.spiffe import Identity
from controller.ca import CertificateAuthority, new_root


def csr_pem(key: CertificateIssuerPrivateKeyTypes | None = None, uri: str | None = None, cn: str | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def rsa_csr_pem() -> str:
    return csr_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def tampered_csr_pem() -> str:
    """A well-formed CSR whose signature no longer matches its content."""
    good = x509.load_pem_x509_csr(csr_pem(cn="aaaaaaaaaaaa").encode())
    der = good.public_bytes(serialization.Encoding.DER).replace(b"aaaaaaaaaaaa", b"bbbbbbbbbbbb")
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_plugged_ca(directory: Path, trust_domain: str = "cluster.local") -> tuple[x509.Certificate, x509.Certificate]:
    """An operator's root and an intermediate signed by it, written as ca-cert/ca-key/cert-chain/root-cert.pem."""
    root, root_key = new_root(trust_domain)
    return root, write_intermediate(directory, root, root_key)


def write_intermediate(
    directory: Path,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    not_before_in: float = -60.0,
    name: str = "operator intermediate",
) -> x509.Certificate:
    """An intermediate signed by ``root``, valid from ``not_before_in`` seconds from now (this node's clock) for 30
    days, written with ``root`` as the CA's signing chain (ca-cert/ca-key/cert-chain/root-cert.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(seconds=not_before_in))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(_pem(inter))
    (directory / "ca-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "cert-chain.pem").write_bytes(_pem(inter) + _pem(root))
    (directory / "root-cert.pem").write_bytes(_pem(root))
    return inter


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Identity | None, Identity | None, str]:
    """Complete a TLS handshake in memory; returns (client identity seen by the server, server identity seen by
    the client, ALPN). Raises ssl.SSLError when either side refuses the other."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate only once it reads the client's Finished.
            with contextlib.suppress(ssl.SSLWantReadError):
                server.read(1)
            return tls.peer_identity(server), tls.peer_identity(client), client.selected_alpn_protocol() or ""
    raise AssertionError("handshake did not complete")


class CaSigner:
    """The agent's CA client over a CertificateAuthority in the test's process: signs at once, counts its calls."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.calls = 0

    async def create_certificate(self, csr: str, identity: Identity, ttl_seconds: int) -> list[str]:
        self.calls += 1
        return self.ca.sign_csr(csr, identity, ttl_seconds)

    def update_roots(self, roots_pem: Sequence[str]) -> None:
        pass
