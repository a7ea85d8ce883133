"""X.509 chain facts shared by the CA (checking its own directory) and the agent (checking what the CA returned)."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

# What decoding a certificate's fields raises when they are not well formed.
_MALFORMED = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class PemError(ValueError):
    """Text that should hold PEM certificates does not."""


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_pem_certs(data: bytes | str, source: str) -> list[x509.Certificate]:
    """All certificates in ``data`` (empty text gives none); ``source`` names where it came from in errors.

    cryptography decodes a certificate's names, extensions and key only when first read, so a certificate whose
    outer DER is intact but whose fields are not would pass here and raise ValueError (or UnsupportedAlgorithm)
    later, wherever it is first used. Every field the CA and the agent read is decoded here instead.
    """
    raw = data.encode() if isinstance(data, str) else data
    if not raw.strip():
        return []
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except (ValueError, x509.InvalidVersion):
        raise PemError(f"{source}: not PEM certificates") from None
    for i, cert in enumerate(certs):
        try:
            _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc, cert.not_valid_after_utc)
            cert.public_key()
        except _MALFORMED as e:
            raise PemError(f"{source}: certificate {i + 1} is malformed: {e}") from None
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and issued_by(cert, cert)


def path_to_root(
    cert: x509.Certificate, pool: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> tuple[list[x509.Certificate], x509.Certificate] | None:
    """Certificates of ``pool`` between ``cert`` and one of ``roots``, and that root; None when no path exists.

    Every link's signature is checked; the walk is bounded by the pool size, so cycles cannot loop.
    """
    between: list[x509.Certificate] = []
    current = cert
    for _ in range(len(pool) + 1):
        anchor = next((r for r in roots if issued_by(current, r)), None)
        if anchor is not None:
            return between, anchor
        nxt = next((c for c in pool if c is not current and not is_self_signed(c) and issued_by(current, c)), None)
        if nxt is None:
            return None
        between.append(nxt)
        current = nxt
    return None
