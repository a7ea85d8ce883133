"""TLS contexts for mesh mTLS (HBONE, controller gRPC) and SPIFFE peer checks.

Python's ``ssl`` has no custom verification callback, so chain verification is left to OpenSSL (mesh roots as
the only trust anchors, no hostname check, no SNI) and the SPIFFE URI SAN and trust domain are checked right after
the handshake with :func:`peer_identity` / :func:`verify_peer`.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterable

from cryptography import x509

from common.spiffe import Identity, InvalidIdentity

ALPN_H2 = "h2"
# What BoringSSL/Envoy negotiates; AES-128-GCM is also the fastest AEAD with AES-NI here.
TLS13_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"


class PeerVerificationError(Exception):
    """The peer presented a certificate that chains to our roots but is not the identity we need."""


def _load_chain(ctx: ssl.SSLContext, cert_chain_pem: str, key_pem: str) -> None:
    # ssl can only load keys from files; use a private tmpfs-backed file that is removed immediately.
    fd, path = tempfile.mkstemp(prefix="ambit-key-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cert_chain_pem)
            if not cert_chain_pem.endswith("\n"):
                f.write("\n")
            f.write(key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def _base_context(purpose: ssl.Purpose, roots_pem: Iterable[str], alpn: list[str] | None) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if hasattr(ctx, "set_ciphersuites"):
        ctx.set_ciphersuites(TLS13_CIPHERS)
    ctx.options |= ssl.OP_NO_TICKET
    roots = "\n".join(r.strip() for r in roots_pem) + "\n"
    ctx.load_verify_locations(cadata=roots)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def server_context(
    cert_chain_pem: str, key_pem: str, roots_pem: Iterable[str], alpn: list[str] | None = None
) -> ssl.SSLContext:
    """Server side of mesh mTLS: client certificate required, chained to one of ``roots_pem``."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, roots_pem, alpn)
    _load_chain(ctx, cert_chain_pem, key_pem)
    return ctx


def client_context(
    roots_pem: Iterable[str],
    cert_chain_pem: str | None = None,
    key_pem: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """Client side: server chain must verify against ``roots_pem``; a client certificate is sent when given."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, roots_pem, alpn)
    if cert_chain_pem and key_pem:
        _load_chain(ctx, cert_chain_pem, key_pem)
    return ctx


def uri_sans(cert_der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def peer_identity(ssl_obj: ssl.SSLObject | ssl.SSLSocket) -> Identity | None:
    """The SPIFFE identity in the peer's leaf certificate, or None when it has none we can parse."""
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        return None
    for uri in uri_sans(der):
        try:
            return Identity.parse(uri)
        except InvalidIdentity:
            continue
    return None


def verify_peer(
    ssl_obj: ssl.SSLObject | ssl.SSLSocket,
    *,
    trust_domain: str | None = None,
    expected: Iterable[Identity] | None = None,
) -> Identity:
    """Check the peer's SPIFFE identity after the handshake: same trust domain and, if given, one of ``expected``."""
    ident = peer_identity(ssl_obj)
    if ident is None:
        raise PeerVerificationError("peer certificate has no SPIFFE URI SAN")
    if trust_domain is not None and ident.trust_domain != trust_domain:
        raise PeerVerificationError(f"peer {ident} is not in trust domain {trust_domain}")
    if expected is not None:
        allowed = set(expected)
        if ident not in allowed:
            raise PeerVerificationError(f"peer {ident} is not one of {sorted(str(i) for i in allowed)}")
    return ident
