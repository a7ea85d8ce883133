"""The mesh certificate authority: signs workload certificates for SPIFFE identities.

State lives in a directory in Istio's plug-in layout so an operator can replace the self-signed root with an
intermediate from their own PKI without changing anything else:

- ``ca-cert.pem`` / ``ca-key.pem``: the signing certificate and its key (a self-signed root on first start);
- ``cert-chain.pem``: the chain from ``ca-cert.pem`` up to its root (empty or absent for a self-signed root);
- ``root-cert.pem``: the trust bundle, one or more roots. Several roots exist during a rotation
  (docs/ca-rotation.md); every issued chain carries all of them so agents learn the bundle from the CA itself.

The directory is re-read when its files change, so rotation steps take effect without a restart; a change that
does not form a consistent CA (key not matching the certificate, chain not reaching a bundled root) is refused
and the last good state keeps signing.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.files import write_atomic
from common.log import kv
from common.pki import PemError, cert_pem, fingerprint, is_self_signed, load_pem_certs, path_to_root
from common.spiffe import Identity

log = logging.getLogger("ambit.ca")

DEFAULT_TTL_SECONDS = 24 * 3600
MAX_TTL_SECONDS = 90 * 24 * 3600
# Peers whose clocks run a little behind must still accept a freshly issued certificate: not_before is backdated
# by this much, as Istio's CA does (pki/util ClockSkewGracePeriod, 2 minutes).
CLOCK_SKEW_SECONDS = 120
# The CA's own certificates (the roots it mints, the controller's serving certificate) are backdated further. Agents
# verify the controller with their own clocks, and a node more than CLOCK_SKEW_SECONDS behind could not connect to
# it (no config, no certificates) for that long after every controller start, serving re-issue and new root. Their
# notBefore protects nothing: they only ever serve live handshakes. Workload certificates keep Istio's figure; the
# agent holds a renewal that is not valid yet by its clock until it is (agent/identity.py).
CA_BACKDATE_SECONDS = 3600
ROOT_VALIDITY_DAYS = 10 * 365
MAX_CSR_BYTES = 64 * 1024
# Re-reading the directory is cheap, but there is no point doing it for every request of a burst.
RELOAD_INTERVAL_SECONDS = 1.0

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
ROOT_CERT = "root-cert.pem"
CA_FILES = (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT)
# Staging files of a root rotation for the self-signed mode (see rotation helpers below).
NEXT_CA_CERT = "next-ca-cert.pem"
NEXT_CA_KEY = "next-ca-key.pem"


class CaError(Exception):
    """Base of everything the CA refuses."""


class CsrError(CaError):
    """The certificate signing request is unusable: not PEM/DER, bad signature, or a refused key type."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TtlError(CaError):
    """The requested validity exceeds what the CA issues."""


class IdentityError(CaError):
    """The identity to sign for is outside the CA's trust domain."""


class CaExpiredError(CaError):
    """The signing certificate has expired: nothing can be issued until the CA is rotated."""


class CaLoadError(CaError):
    """The CA directory does not hold a consistent CA; names the file and what is wrong."""


@dataclass(frozen=True)
class CaMaterial:
    """One consistent signing state, swapped atomically on reload."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    intermediates: tuple[x509.Certificate, ...]  # between ca-cert (included when not a root) and the anchor
    anchor: x509.Certificate  # the root the signing chain ends in
    roots: tuple[x509.Certificate, ...]  # the trust bundle, anchor included
    generation: int

    @property
    def chain_not_after(self) -> datetime.datetime:
        """When the first certificate a leaf chains through expires (signing certificate, intermediates, anchor).
        Peers check every one of them, so a leaf is worthless past this instant whatever its own notAfter says."""
        return min(c.not_valid_after_utc for c in (self.cert, *self.intermediates, self.anchor))

    @property
    def earliest_not_after(self) -> datetime.datetime:
        """When the first certificate of the signing chain or of the bundle expires: :attr:`chain_not_after`, or
        a bundled root that no leaf chains through (a rotation's other root) if that comes first. The anchor is
        one of the bundle's roots, so this is never later than the chain's end."""
        return min(self.chain_not_after, *(r.not_valid_after_utc for r in self.roots))


@dataclass(frozen=True)
class IssuedKeyPair:
    """A certificate with a key generated by the CA itself (only for the controller's own serving cert)."""

    chain_pem: list[str]
    key_pem: str
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _load_certs(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        return load_pem_certs(data, source)
    except PemError as e:
        raise CaLoadError(str(e)) from None


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_root(
    trust_domain: str, *, days: int = ROOT_VALIDITY_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed root. pathlen 0: it signs leaves directly; an operator wanting intermediates plugs in
    their own PKI instead. The serial-bearing CN tells roots apart in a bundle during rotation."""
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Ambit root CA {serial:x}"[:64]),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(seconds=CA_BACKDATE_SECONDS))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _file_state(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for name in CA_FILES:
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            continue
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _load_material(directory: Path, generation: int) -> CaMaterial:
    """Read the directory's files and cross-check them (:func:`check_material`), naming each file by its path."""
    contents = {}
    for name in CA_FILES:
        try:
            contents[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            continue
    return check_material(contents, lambda name: str(directory / name), generation)


def check_material(contents: Mapping[str, bytes], where: Callable[[str], str], generation: int = 0) -> CaMaterial:
    """The consistent CA that ``contents`` (file name -> bytes, Istio's layout) forms, else CaLoadError naming the
    offending file as ``where(name)`` says (a path, or a Secret's data key)."""
    cert_path, key_path = where(CA_CERT), where(CA_KEY)
    for name in (CA_CERT, CA_KEY):
        if name not in contents:
            raise CaLoadError(f"{where(name)}: missing")
    certs = _load_certs(contents[CA_CERT], cert_path)
    if not certs:
        raise CaLoadError(f"{cert_path}: no certificate")
    cert = certs[0]
    try:
        key = serialization.load_pem_private_key(contents[CA_KEY], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CaLoadError(f"{key_path}: not an unencrypted PEM private key ({type(e).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaLoadError(f"{key_path}: unsupported key type {type(key).__name__} (ECDSA or RSA)")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise CaLoadError(f"{key_path}: key does not match the certificate in {cert_path}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaLoadError(f"{cert_path}: not a CA certificate (basicConstraints CA:true required)")

    chain_path, roots_path = where(CERT_CHAIN), where(ROOT_CERT)
    chain = _load_certs(contents[CERT_CHAIN], chain_path) if CERT_CHAIN in contents else []
    roots = _load_certs(contents[ROOT_CERT], roots_path) if ROOT_CERT in contents else []
    if is_self_signed(cert) and all(fingerprint(r) != fingerprint(cert) for r in roots):
        roots.insert(0, cert)
    if not roots:
        raise CaLoadError(f"{roots_path}: no root certificate for the plugged-in CA {cert_path}")
    for r in roots:
        if not is_self_signed(r):
            raise CaLoadError(f"{roots_path}: {r.subject.rfc4514_string()} is not a self-signed root")

    # ca-cert -> cert-chain -> a bundled root, every signature checked.
    path = path_to_root(cert, [c for c in chain if fingerprint(c) != fingerprint(cert)], roots)
    if path is None:
        raise CaLoadError(f"{chain_path}: no chain from {cert_path} to a root in {roots_path}")
    between, anchor = path
    intermediates = ([] if fingerprint(cert) == fingerprint(anchor) else [cert]) + between
    if cert.not_valid_after_utc <= _now():
        raise CaLoadError(f"{cert_path}: CA certificate expired at {cert.not_valid_after_utc.isoformat()}")
    for c in (*between, anchor):
        if c.not_valid_after_utc <= _now():
            raise CaLoadError(
                f"{chain_path if c in between else roots_path}: {c.subject.rfc4514_string()}, which {cert_path} "
                f"chains through, expired at {c.not_valid_after_utc.isoformat()}"
            )
    return CaMaterial(cert, key, tuple(intermediates), anchor, tuple(roots), generation)


class CertificateAuthority:
    """Signs SPIFFE workload certificates from a CA kept in ``directory``.

    Thread-safe for reads: the signing material is one immutable object swapped on reload (gRPC's server-credential
    callback runs on a core thread).
    """

    def __init__(self, directory: Path | str, trust_domain: str, *, max_ttl_seconds: int = MAX_TTL_SECONDS) -> None:
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.max_ttl_seconds = max_ttl_seconds
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._cut_warned = 0  # the generation whose expiry was last warned about
        self._ensure_initialized()
        self._files = _file_state(self.directory)
        self._material = _load_material(self.directory, 1)
        log.info(
            "CA loaded",
            extra=kv(
                ca_dir=str(self.directory),
                signing=self._material.cert.subject.rfc4514_string(),
                roots=[fingerprint(r)[:16] for r in self._material.roots],
                chain_expires=self._material.chain_not_after.isoformat(),
            ),
        )

    def _ensure_initialized(self) -> None:
        d = self.directory
        if not d.exists():
            d.mkdir(parents=True, mode=0o700)
        has_cert, has_key = (d / CA_CERT).exists(), (d / CA_KEY).exists()
        if has_cert and has_key:
            return
        if has_cert or has_key:
            missing = CA_KEY if has_cert else CA_CERT
            raise CaLoadError(f"{d / missing}: missing while its pair exists; refusing to overwrite a partial CA")
        present = [name for name in (CERT_CHAIN, ROOT_CERT) if (d / name).exists()]
        if present:
            # A plugged-in CA being copied in, not a first start: minting a root would overwrite the operator's bundle.
            raise CaLoadError(
                f"{d / CA_CERT}, {d / CA_KEY}: missing while {', '.join(present)} exist; "
                "refusing to create a self-signed root over a partial plugged-in CA"
            )
        cert, key = new_root(self.trust_domain)
        # Key first: a crash between the writes leaves a key without a cert, which the next start refuses loudly
        # rather than silently minting a second root.
        write_atomic(d / CA_KEY, key_pem(key), 0o600)
        write_atomic(d / ROOT_CERT, cert_pem(cert).encode(), 0o644)
        write_atomic(d / CA_CERT, cert_pem(cert).encode(), 0o644)
        log.info("created self-signed root CA", extra=kv(ca_dir=str(d), root=fingerprint(cert)[:16]))

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Pick up rotation steps written to the directory; keep the last good state when they are inconsistent."""
        now = time.monotonic()
        if not force and now - self._checked_at < RELOAD_INTERVAL_SECONDS:
            return False
        with self._lock:
            self._checked_at = now
            files = _file_state(self.directory)
            if files == self._files:
                return False
            try:
                material = _load_material(self.directory, self._material.generation + 1)
            except (CaLoadError, OSError) as e:
                log.error(
                    "CA directory changed but is not usable; still signing with the previous CA", extra=kv(error=str(e))
                )
                return False
            self._files = files
            self._material = material
        log.info(
            "CA reloaded",
            extra=kv(
                signing=material.cert.subject.rfc4514_string(),
                roots=[fingerprint(r)[:16] for r in material.roots],
                chain_expires=material.chain_not_after.isoformat(),
            ),
        )
        return True

    @property
    def generation(self) -> int:
        """Changes whenever the signing material or the bundle changes; lets callers re-issue dependent certs."""
        return self._material.generation

    def chain_expiry(self) -> float:
        """Unix time when the signing chain (not counting other bundled roots) expires: no leaf outlives it.

        Read at every scrape (citadel_server_cert_chain_expiry_timestamp), so the directory is checked first (at
        most once a second): a rotation step shows in the gauges without waiting for the next signature or
        handshake, as istiod's watch on its cacerts directory does (pilot/pkg/bootstrap/istio_ca.go)."""
        self.reload_if_changed()
        return self._material.chain_not_after.timestamp()

    def earliest_expiry(self) -> float:
        """Unix time when the first certificate of the signing chain or bundle expires (the alerting horizon); the
        directory is checked first, as for :meth:`chain_expiry`."""
        self.reload_if_changed()
        return self._material.earliest_not_after.timestamp()

    def roots_pem(self) -> list[str]:
        return [cert_pem(r) for r in self._material.roots]

    def chain_tail(self) -> list[str]:
        """What follows a leaf in a response: intermediates, the other bundled roots, and the anchor root last."""
        return _chain_tail(self._material)

    def _ttl(self, ttl_seconds: int) -> int:
        if ttl_seconds <= 0:
            return DEFAULT_TTL_SECONDS
        if ttl_seconds > self.max_ttl_seconds:
            raise TtlError(f"requested validity {ttl_seconds}s exceeds the maximum {self.max_ttl_seconds}s")
        return ttl_seconds

    def _issue(
        self,
        m: CaMaterial,
        public_key: ec.EllipticCurvePublicKey,
        sans: Sequence[x509.GeneralName],
        ttl_seconds: int,
        *,
        server: bool,
        backdate_seconds: int = CLOCK_SKEW_SECONDS,
    ) -> x509.Certificate:
        now = _now()
        chain_end = m.chain_not_after
        if chain_end <= now:
            # Checked at load, but a CA (a plugged-in intermediate, typically) can expire while serving.
            raise CaExpiredError(
                f"{self.directory / CA_CERT}: the signing CA expired at {chain_end.isoformat()}; "
                "rotate it (docs/ca-rotation.md)"
            )
        not_after = now + datetime.timedelta(seconds=ttl_seconds)
        if not_after > chain_end:
            # Unlike istiod (which issues the requested TTL past its own expiry), the leaf says when peers stop
            # accepting it, so agents know to renew before then. Their refresh has a floor (agent/identity.py),
            # which keeps these shrinking lifetimes from turning into a refresh storm.
            not_after = chain_end
            self._warn_cut(m, chain_end, now)
        # Workload certificates serve both ends of HBONE; the controller's only serves.
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        if not server:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        try:
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                m.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            )
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(m.key.public_key())
        builder = (
            x509.CertificateBuilder()
            # Empty subject, identity only in a critical SAN: what Istio issues and what SPIFFE X.509-SVIDs expect.
            .subject_name(x509.Name([]))
            .issuer_name(m.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=backdate_seconds))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(aki, critical=False)
        )
        return builder.sign(m.key, hashes.SHA256())

    def _warn_cut(self, m: CaMaterial, chain_end: datetime.datetime, now: datetime.datetime) -> None:
        """Once per CA state: every certificate issued from now on is cut short, which only a rotation ends."""
        if self._cut_warned == m.generation:
            return
        self._cut_warned = m.generation
        log.warning(
            "the signing CA expires soon: certificates are cut to its expiry; rotate it (docs/ca-rotation.md)",
            extra=kv(
                ca_dir=str(self.directory),
                expires=chain_end.isoformat(),
                remaining_seconds=int((chain_end - now).total_seconds()),
            ),
        )

    def sign_csr(self, csr_pem: str | bytes, identity: Identity, ttl_seconds: int) -> list[str]:
        """Sign ``csr_pem`` for ``identity``: the PEM chain, leaf first, root last.

        The CSR only contributes its public key; the SAN is set from ``identity`` (the caller was authorized for
        exactly that identity, whatever the CSR asks for).
        """
        self.reload_if_changed()
        if identity.trust_domain != self.trust_domain:
            raise IdentityError(f"identity {identity} is not in trust domain {self.trust_domain}")
        ttl = self._ttl(ttl_seconds)
        public_key = parse_csr(csr_pem)
        # One state for the leaf and its chain: gRPC's serving-certificate callback may reload in between.
        m = self._material
        leaf = self._issue(m, public_key, [x509.UniformResourceIdentifier(str(identity))], ttl, server=False)
        return [cert_pem(leaf), *_chain_tail(m)]

    def issue_serving_certificate(
        self, dns_names: Iterable[str], ip_addresses: Iterable[str], ttl_seconds: int = DEFAULT_TTL_SECONDS
    ) -> IssuedKeyPair:
        """The controller's own TLS certificate for port 15012 (agents verify it against the bundle)."""
        self.reload_if_changed()
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        m = self._material
        leaf = self._issue(
            m, key.public_key(), sans, self._ttl(ttl_seconds), server=True, backdate_seconds=CA_BACKDATE_SECONDS
        )
        chain = [cert_pem(leaf), *[cert_pem(c) for c in m.intermediates]]
        return IssuedKeyPair(chain, key_pem(key).decode(), leaf.not_valid_after_utc)


def _chain_tail(m: CaMaterial) -> list[str]:
    others = [r for r in m.roots if fingerprint(r) != fingerprint(m.anchor)]
    return [cert_pem(c) for c in (*m.intermediates, *others, m.anchor)]


def parse_csr(csr_pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """Validate a CSR and return its ECDSA P-256 public key, or raise CsrError with a reason label."""
    raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(raw) > MAX_CSR_BYTES:
        raise CsrError("bad_csr", f"CSR is {len(raw)} bytes; at most {MAX_CSR_BYTES} accepted")
    try:
        csr = x509.load_pem_x509_csr(raw)
    except ValueError:
        raise CsrError("bad_csr", "not a PEM-encoded PKCS#10 certificate request") from None
    except x509.InvalidVersion as e:
        raise CsrError("bad_csr", f"not a PKCS#10 certificate request: {e}") from None
    # A key algorithm or curve OpenSSL does not implement surfaces as UnsupportedAlgorithm from either call.
    try:
        valid = csr.is_signature_valid
    except (ValueError, x509.UnsupportedGeneralNameType, UnsupportedAlgorithm) as e:
        raise CsrError("bad_csr", f"CSR cannot be checked: {e}") from None
    if not valid:
        raise CsrError("bad_csr_signature", "CSR signature does not verify against its own public key")
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CsrError("bad_csr", f"CSR public key is unreadable: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CsrError("bad_key_type", f"CSR key is {_describe_key(key)}; only ECDSA P-256 keys are accepted")
    if not isinstance(key.curve, ec.SECP256R1):
        raise CsrError("bad_key_type", f"CSR key is ECDSA {key.curve.name}; only ECDSA P-256 keys are accepted")
    return key


def _describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__.removesuffix("PublicKey").lstrip("_") or "unknown"
