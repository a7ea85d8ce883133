"""Per-workload certificates in the agent (ztunnel's identity manager).

Keys (ECDSA P-256) are generated here and never leave the process; the controller's CA signs CSRs for the
identities of workloads on this node. Fetches go through one priority queue so that a connection waiting for a
certificate (RealTime) overtakes warm-up of newly seen workloads (Warmup), which overtakes routine refreshes
(Background). Certificates are refreshed at half-life, moved by a small random jitter so that certificates fetched
together are not renewed together, and never more often than a floor (a CA near its own expiry cuts every
certificate to it: see next_refresh); failures back off exponentially with jitter while the still-valid certificate
keeps serving. A certificate counts as valid while its whole chain is. Times are this node's clock: a renewal whose
chain's latest notBefore (the leaf's, or an intermediate's minted moments ago) is still in its future (a CA clock
ahead by more than its backdating) waits for it while the current certificate serves.

The trust bundle is whatever roots the CA returned last (several during a root rotation); when it changes every
SSL context is rebuilt. It lives in memory only, as ztunnel's: a restarted agent trusts its --root-cert file (kept
current by the controller's ConfigMap, re-read at every connection) and then the CA's next answer. A bundle kept
on disk would bring back, at the one moment the agent has nothing newer, roots an operator retired, possibly
because their key leaked (docs/ca-rotation.md, "Agent restarts").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import enum
import itertools
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ca_client import CaRequestError, CertificateSigner
from agent.prometheus import Counter, Gauge, Registry
from common import tls
from common.log import kv
from common.pki import PemError, cert_pem, fingerprint, is_self_signed, load_pem_certs, path_to_root
from common.spiffe import Identity

log = logging.getLogger("ambit.identity")

DEFAULT_TTL_SECONDS = 24 * 3600
# Each refresh moves by up to this fraction of the lifetime either way (Istio's SECRET_GRACE_PERIOD_RATIO_JITTER).
DEFAULT_REFRESH_JITTER = 0.01
# Renewals come at most this often, as a fraction of the requested TTL (90 minutes for 24 h certificates; the
# agent's --cert-min-refresh sets it in seconds): see next_refresh for why, and for the one renewal allowed inside
# that interval, just before expiry.
DEFAULT_MIN_REFRESH_FRACTION = 1 / 16
# A renewal due when its certificate lapses comes this long after the lapse: at least a second (a timer firing a
# hair early would get one more certificate from the expiring CA that lapses at once, and again), spread so that a
# whole fleet, whose certificates all lapse with the CA at one instant, does not ask at that instant.
LAPSE_RETRY_SECONDS = (1.0, 15.0)
_ALPN = [tls.ALPN_H2]  # HBONE is HTTP/2 both ways


class Priority(enum.IntEnum):
    """Lower value is served first."""

    REALTIME = 0
    WARMUP = 1
    BACKGROUND = 2


class CertificateUnavailable(Exception):
    """No valid certificate for the identity and the latest fetch failed (or the workload left)."""


class InvalidCertificateResponse(Exception):
    """The CA's answer is unusable: unparsable, wrong identity, wrong key, or not chaining to a returned root."""


@dataclass(frozen=True)
class Backoff:
    """Per-identity retry delays: ``initial`` doubling to ``maximum``, each randomized by +-``jitter``."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 150.0
    jitter: float = 0.2

    def delay(self, failures: int, rng: random.Random) -> float:
        """Delay before the retry that follows the ``failures``-th consecutive failure (``failures`` >= 1)."""
        base = self.initial
        for _ in range(max(0, failures - 1)):
            base *= self.factor
            if base >= self.maximum:
                break
        base = min(base, self.maximum)
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


def refresh_at(not_before: float, not_after: float, received_at: float) -> float:
    """Half-life of the certificate, measured from when we could first use it.

    A CA backdates ``not_before`` for clock skew; counting from it would refresh short-lived certificates late
    (or, with a TTL below the backdating, after expiry). Starting from the later of the two keeps half a TTL of
    margin for retries either way.
    """
    start = max(not_before, received_at)
    return start + max(0.0, not_after - start) / 2


def next_refresh(
    not_before: float,
    expires: float,
    received_at: float,
    *,
    min_interval: float,
    jitter: float,
    rng: random.Random,
    previous_expires: float | None = None,
) -> float:
    """When to renew a certificate received at ``received_at`` (this node's clock) that peers accept until
    ``expires``.

    Normally at half-life (:func:`refresh_at`), moved by up to ``jitter`` of the lifetime either way: certificates
    fetched together (an agent or a cluster starting) would otherwise be renewed together again every half TTL,
    forever, and the CA would meet the start-up herd twice a day (28 minutes of spread for 24 h certificates at 1 %).

    Never sooner than ``min_interval`` after receipt. A CA near its own expiry cuts every certificate to it, so each
    renewal's half-life is half the last one's: 12 h, 6 h, ... down to the fetch's own latency (with 5 ms fetches,
    24 renewals per workload in the CA's last day, 17 of them in its last quarter of an hour), on every node at
    once. No renewal can outlive that CA, so the only point of renewing early is to pick up a CA rotated
    meanwhile, which the floor still does (5 renewals in that day, the last inside its final 90 minutes).
    A certificate that expires within ``min_interval`` gets one renewal at 50 to 90 % of what is left of it (the
    last chance to move to a rotated CA before this one lapses, spread so that nodes do not come at one instant);
    when a renewal expires no later than the certificate it replaces (the same expiring CA signed it), the next one
    is due 1 to 15 s after its expiry: it then fails, the backoff takes over, and the lapse is logged as an error. (A
    connection that needs the certificate meanwhile asks at once.)
    """
    remaining = expires - received_at
    if remaining <= min_interval:
        if previous_expires is not None and expires <= previous_expires:
            return expires + rng.uniform(*LAPSE_RETRY_SECONDS)
        return received_at + max(0.0, remaining) * rng.uniform(0.5, 0.9)
    start = max(not_before, received_at)
    life = expires - start
    return max(start + life / 2 + rng.uniform(-jitter, jitter) * life, received_at + min_interval)


@dataclass(frozen=True)
class IssuedCertificate:
    identity: Identity
    chain_pem: str  # leaf + intermediates: what we present in handshakes
    key_pem: str
    roots_pem: tuple[str, ...]
    serial: int
    not_before: float
    not_after: float
    refresh_at: float
    # The earliest expiry among the intermediates and the root the leaf chains through: peers check all of them.
    ca_not_after: float
    # The latest notBefore among them, likewise: an intermediate minted moments ago by a clock ahead of this
    # node's makes the whole chain not valid yet here, however far back the leaf is dated.
    ca_not_before: float

    @property
    def expires(self) -> float:
        """When peers stop accepting the chain: the leaf's expiry, or its CA's if that comes first (istiod issues
        the requested TTL past its own expiry; ours cuts the leaf to it)."""
        return min(self.not_after, self.ca_not_after)

    @property
    def valid_from(self) -> float:
        """When peers start accepting the chain: the latest notBefore of the leaf and of every certificate it
        chains through (OpenSSL and BoringSSL check each one's validity period, the anchor's included)."""
        return max(self.not_before, self.ca_not_before)


def new_key_and_csr(identity: Identity) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a CSR naming the identity in a URI SAN, as ztunnel's (the CA sets the SAN anyway)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def parse_response(
    chain_pem: Sequence[str], identity: Identity, key: ec.EllipticCurvePrivateKey, received_at: float
) -> IssuedCertificate:
    """Check a CreateCertificate answer and split it into what we present and what we trust.

    Self-signed elements are the trust bundle (all of them: a rotation serves several roots); the rest are the
    leaf and its intermediates, which must chain to one of those roots.
    """
    try:
        certs = [c for pem in chain_pem for c in load_pem_certs(pem, "cert_chain")]
    except PemError as e:
        raise InvalidCertificateResponse(str(e)) from None
    if len(certs) < 2:
        raise InvalidCertificateResponse(f"cert_chain has {len(certs)} certificates; expected a leaf and a root")
    leaf, rest = certs[0], certs[1:]
    roots = [c for c in rest if is_self_signed(c)]
    intermediates = [c for c in rest if not is_self_signed(c)]
    if not roots:
        raise InvalidCertificateResponse("cert_chain carries no root certificate")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [str(identity)]:
        raise InvalidCertificateResponse(f"leaf certificate names {uris}, requested {identity}")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
        raise InvalidCertificateResponse("leaf certificate is not for the key we generated")
    path = path_to_root(leaf, intermediates, roots)
    if path is None:
        raise InvalidCertificateResponse("leaf certificate does not chain to a root in cert_chain")
    between, anchor = path
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= received_at:
        raise InvalidCertificateResponse(f"leaf certificate expired at {leaf.not_valid_after_utc.isoformat()}")
    ca_expiry = min(c.not_valid_after_utc for c in (*between, anchor))
    if ca_expiry.timestamp() <= received_at:
        raise InvalidCertificateResponse(f"the CA chain of the leaf certificate expired at {ca_expiry.isoformat()}")
    ca_not_before = max(c.not_valid_before_utc for c in (*between, anchor)).timestamp()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return IssuedCertificate(
        identity=identity,
        chain_pem="".join(cert_pem(c) for c in [leaf, *between]),
        key_pem=key_pem,
        roots_pem=tuple(cert_pem(r) for r in sorted(roots, key=fingerprint)),
        serial=leaf.serial_number,
        not_before=not_before,
        not_after=not_after,
        refresh_at=refresh_at(max(not_before, ca_not_before), min(not_after, ca_expiry.timestamp()), received_at),
        ca_not_after=ca_expiry.timestamp(),
        ca_not_before=ca_not_before,
    )


@dataclass(eq=False)
class _Entry:
    identity: Identity
    cert: IssuedCertificate | None = None
    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None
    fetching: bool = False
    failures: int = 0
    last_error: str = ""
    queued: Priority | None = None
    queued_seq: int = -1
    timer: asyncio.TimerHandle | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    # A renewal not valid yet by this node's clock, waiting for its notBefore while ``cert`` keeps serving.
    staged: IssuedCertificate | None = None

    def valid(self, now: float) -> bool:
        return self.cert is not None and self.cert.expires > now

    def state(self, now: float) -> str:
        """ztunnel's certificate states, as its /config_dump words them: `Available` whenever a valid certificate
        is held (a refresh running or failing does not change that: the certificate keeps serving), `Unavailable:
        <why>` when none is and the last fetch failed (also while its retry runs) or the held one expired,
        `Initializing` until the first answer."""
        if self.valid(now):
            return "Available"
        if self.last_error:
            return f"Unavailable: {self.last_error}"
        if self.cert is not None:
            return f"Unavailable: certificate expired at {_iso(self.cert.expires)}"
        return "Initializing"


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class CertDump(TypedDict):
    """One certificate as ztunnel's /config_dump shows it (its admin.rs CertDump), so that `istioctl ztunnel-config
    certificates` and scripts written for ztunnel read ours: `pem` is the base64 of the PEM text (not the PEM),
    `serialNumber` the serial in decimal, `validFrom`/`expirationTime` RFC 3339 UTC in whole seconds."""

    pem: str
    serialNumber: str
    validFrom: str
    expirationTime: str


class CertsDump(TypedDict):
    """One identity in /config_dump's `certificates` (and /certs): ztunnel's CertsDump, `certChain` the leaf then
    its intermediates, `rootCerts` the trust bundle, both empty unless `state` is `Available`. `refreshAt` (when
    the next renewal is due, "" without a certificate) and `lastError` ("" once a fetch succeeds) are ours:
    ztunnel's readers ignore keys they do not know."""

    identity: str
    state: str
    certChain: list[CertDump]
    rootCerts: list[CertDump]
    refreshAt: str
    lastError: str


def cert_dump(cert: x509.Certificate) -> CertDump:
    return {
        "pem": base64.b64encode(cert_pem(cert).encode()).decode(),
        "serialNumber": str(cert.serial_number),
        "validFrom": _iso(cert.not_valid_before_utc.timestamp()),
        "expirationTime": _iso(cert.not_valid_after_utc.timestamp()),
    }


class CertificateManager:
    """Holds one certificate (and its server/client SSL contexts) per local workload identity."""

    def __init__(
        self,
        signer: CertificateSigner,
        trust_domain: str,
        *,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        initial_roots: Sequence[str] = (),
        registry: Registry | None = None,
        backoff: Backoff | None = None,
        concurrency: int = 4,
        rng: random.Random | None = None,
        refresh_jitter: float = DEFAULT_REFRESH_JITTER,
        min_refresh_interval: float | None = None,
    ) -> None:
        self.signer = signer
        self.trust_domain = trust_domain
        self.ttl_seconds = ttl_seconds
        self.backoff = backoff or Backoff()
        self.concurrency = concurrency
        self.refresh_jitter = refresh_jitter
        self.min_refresh_interval = (
            ttl_seconds * DEFAULT_MIN_REFRESH_FRACTION if min_refresh_interval is None else min_refresh_interval
        )
        self._ca_expiry_warned = 0.0  # the CA expiry last logged, so that N workloads do not log it N times
        self._rng = rng or random.Random()
        self._roots: tuple[str, ...] = tuple(initial_roots)
        self._entries: dict[Identity, _Entry] = {}
        self._queue: asyncio.PriorityQueue[tuple[int, int, Identity]] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._workers: list[asyncio.Task[None]] = []
        self._dumped: dict[str, list[CertDump]] = {}
        reg = registry if registry is not None else Registry()
        self._expiry = Gauge(
            "ambit_cert_expiry_seconds",
            "Expiry time (Unix seconds) of the certificate held for each workload identity",
            ["identity"],
            registry=reg,
        )
        self._errors = Counter(
            "ambit_cert_fetch_errors", "Failed certificate fetches by reason", ["reason"], registry=reg
        )
        self._chain_expiry = Gauge(
            "ambit_cert_chain_expiry_seconds",
            "Expiry time (Unix seconds) of the CA chain (intermediates and root) each identity's certificate "
            "depends on: no renewal outlives it until the CA is rotated",
            ["identity"],
            registry=reg,
        )
        self._ahead = Gauge(
            "ambit_cert_not_before_ahead_seconds",
            "How far in this node's future the latest notBefore of the latest certificate's chain (leaf, "
            "intermediates, root) was; above 0 the CA's clock runs ahead of this node's by more than its backdating",
            registry=reg,
        )

    # -- public API ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the fetch workers (also done lazily on first use); needs a running event loop."""
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._worker(), name=f"cert-fetch-{i}") for i in range(self.concurrency)
            ]

    async def close(self) -> None:
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        self._workers = []
        for entry in self._entries.values():
            self._forget(entry, "certificate manager closed")
        self._entries.clear()

    def roots(self) -> list[str]:
        return list(self._roots)

    def prefetch(self, idents: Iterable[Identity]) -> None:
        """Workloads appeared on this node: fetch their certificates before the first connection needs them."""
        now = time.time()
        for ident in idents:
            entry = self._entries.get(ident)
            if entry is None or not (entry.valid(now) or entry.fetching or entry.queued is not None or entry.timer):
                self._request(ident, Priority.WARMUP)

    def retain_only(self, idents: Iterable[Identity]) -> None:
        """Drop the certificates (and pending fetches) of identities no longer on this node."""
        keep = set(idents)
        for ident in [i for i in self._entries if i not in keep]:
            entry = self._entries.pop(ident)
            self._forget(entry, f"{ident} no longer runs on this node")
            log.info("certificate dropped", extra=kv(identity=str(ident)))

    async def server_context(self, ident: Identity) -> ssl.SSLContext:
        entry = await self._ready(ident)
        assert entry.server_ctx is not None
        return entry.server_ctx

    async def client_context(self, ident: Identity) -> ssl.SSLContext:
        """Built on first use: many local workloads only ever receive, and an SSLContext holding a chain, a key
        and the roots is ~25 KB of OpenSSL memory."""
        entry = await self._ready(ident)
        if entry.client_ctx is None:
            assert entry.cert is not None
            entry.client_ctx = tls.client_context(self._roots, entry.cert.chain_pem, entry.cert.key_pem, alpn=_ALPN)
        return entry.client_ctx

    def certificate(self, ident: Identity) -> IssuedCertificate | None:
        """The currently held certificate, valid or not (for inspection and tests)."""
        entry = self._entries.get(ident)
        return entry.cert if entry else None

    def snapshot(self) -> list[CertsDump]:
        """Every identity, sorted, in ztunnel's /config_dump shape (see CertsDump; its dicts are shared between
        calls, read them only). `rootCerts` is the bundle the identity's contexts trust now: the CA's latest, which
        every context was rebuilt with when it changed.

        Certificates are parsed once, not on every dump: the dump runs on the event loop that carries traffic,
        and a node with hundreds of identities would otherwise stall it for tens of milliseconds each time."""
        now = time.time()
        parsed, self._dumped = self._dumped, {}

        def dumps(pem: str) -> list[CertDump]:
            if pem not in self._dumped:
                self._dumped[pem] = parsed.get(pem) or [cert_dump(c) for c in load_pem_certs(pem, "held certificate")]
            return self._dumped[pem]

        rows: list[CertsDump] = []
        for ident in sorted(self._entries, key=str):  # as ztunnel sorts them
            e = self._entries[ident]
            c = e.cert if e.valid(now) else None
            rows.append(
                {
                    "identity": str(ident),
                    "state": e.state(now),
                    "certChain": list(dumps(c.chain_pem)) if c else [],
                    "rootCerts": [d for pem in self._roots for d in dumps(pem)] if c else [],
                    "refreshAt": _iso(c.refresh_at) if c else "",
                    "lastError": e.last_error,
                }
            )
        return rows

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _request(self, ident: Identity, priority: Priority) -> _Entry:
        self.start()
        entry = self._entries.get(ident)
        if entry is None:
            entry = self._entries[ident] = _Entry(ident)
        if entry.fetching or (entry.queued is not None and entry.queued <= priority):
            return entry
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.queued, entry.queued_seq = priority, next(self._seq)
        self._queue.put_nowait((int(priority), entry.queued_seq, ident))
        return entry

    def _schedule(self, entry: _Entry, at: float, priority: Priority) -> None:
        """A fetch at ``at`` (this node's clock)."""
        self._at(entry, at, lambda: self._request(entry.identity, priority))

    def _at(self, entry: _Entry, at: float, action: Callable[[], object]) -> None:
        """The entry's one timer: a fetch, or putting a staged certificate in service."""
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, at - time.time())
        entry.timer = loop.call_later(delay, self._timer_fired, entry, action)

    def _timer_fired(self, entry: _Entry, action: Callable[[], object]) -> None:
        entry.timer = None
        if self._entries.get(entry.identity) is entry:
            action()

    async def _ready(self, ident: Identity) -> _Entry:
        entry = self._entries.get(ident)
        if entry is not None and entry.valid(time.time()):
            return entry
        if entry is not None and entry.last_error and entry.timer is not None and not entry.fetching:
            # In backoff without a usable certificate: fail the connection now rather than hold it for minutes.
            raise CertificateUnavailable(f"no certificate for {ident}: {entry.last_error}")
        entry = self._request(ident, Priority.REALTIME)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        await waiter
        return entry

    async def _worker(self) -> None:
        while True:
            priority, seq, ident = await self._queue.get()
            entry = self._entries.get(ident)
            if entry is None or entry.queued_seq != seq or entry.fetching:
                continue  # superseded by a higher-priority request, or the workload left
            entry.queued = None
            entry.fetching = True
            try:
                await self._fetch(entry, Priority(priority))
            except Exception as e:  # a bug or an unexpected client error: retry like any failure, never hang
                log.exception("certificate fetch crashed", extra=kv(identity=str(ident)))
                self._failed(entry, Priority(priority), "internal", f"{type(e).__name__}: {e}")
            finally:
                entry.fetching = False

    # -- fetching -----------------------------------------------------------------------------------------------

    async def _fetch(self, entry: _Entry, priority: Priority) -> None:
        ident = entry.identity
        key, csr = new_key_and_csr(ident)
        try:
            chain = await self.signer.create_certificate(csr, ident, self.ttl_seconds)
            received = time.time()
            issued = parse_response(chain, ident, key, received)
            server_ctx = self._server_context(issued, issued.roots_pem)
        except (CaRequestError, InvalidCertificateResponse, ssl.SSLError, OSError) as e:
            reason = e.reason if isinstance(e, CaRequestError) else "invalid_response"
            self._failed(entry, priority, reason, str(e))
            return
        if self._entries.get(ident) is not entry:
            return  # the workload left while we were fetching
        held = entry.cert if entry.valid(received) else None
        at = next_refresh(
            issued.valid_from,
            issued.expires,
            received,
            min_interval=self.min_refresh_interval,
            jitter=self.refresh_jitter,
            rng=self._rng,
            previous_expires=held.expires if held else None,
        )
        issued = dataclasses.replace(issued, refresh_at=at)
        entry.failures, entry.last_error = 0, ""
        self._check_ca_expiry(issued)
        ahead = issued.valid_from - received
        self._ahead.labels().set(max(0.0, ahead))
        if ahead > 0 and held is not None and held.valid_from <= received:
            # Peers whose clocks agree with ours would refuse it ("not yet valid") until then, and the held one
            # is still good: swap when the new one becomes valid (or when the held one expires, if sooner)
            # rather than flap every renewal. No new request: asking again would only get another one like it.
            entry.staged = issued
            swap = min(issued.valid_from, held.expires)
            self._at(entry, swap, lambda: self._put_in_service(entry, entry.staged))
            log.warning(
                "renewed certificate is not valid yet by this node's clock; the current one serves until it is",
                extra=kv(identity=str(ident), not_before=_iso(issued.valid_from), ahead_seconds=round(ahead, 3)),
            )
        else:
            if ahead > 0:
                log.warning(
                    "certificate is not valid yet by this node's clock; peers with clocks like this node's refuse it "
                    "until its notBefore (the CA's clock is ahead of this node's by more than its backdating)",
                    extra=kv(identity=str(ident), not_before=_iso(issued.valid_from), ahead_seconds=round(ahead, 3)),
                )
            self._put_in_service(entry, issued, server_ctx)
        if issued.roots_pem != self._roots:
            self._roots_changed(issued.roots_pem)

    def _put_in_service(
        self, entry: _Entry, issued: IssuedCertificate | None, server_ctx: ssl.SSLContext | None = None
    ) -> None:
        if issued is None:
            return
        if server_ctx is None:  # a staged certificate: trust the bundle as it is now
            try:
                server_ctx = self._server_context(issued, self._roots)
            except (ssl.SSLError, OSError) as e:
                self._failed(entry, Priority.BACKGROUND, "invalid_response", str(e))
                return
        entry.cert, entry.server_ctx, entry.client_ctx, entry.staged = issued, server_ctx, None, None
        ident = entry.identity
        self._expiry.labels(str(ident)).set(issued.expires)
        self._chain_expiry.labels(str(ident)).set(issued.ca_not_after)
        self._schedule(entry, issued.refresh_at, Priority.BACKGROUND)
        self._wake(entry, None)
        log.info(
            "certificate issued",
            extra=kv(identity=str(ident), serial=f"{issued.serial:x}", expiry=_iso(issued.expires)),
        )

    def _check_ca_expiry(self, issued: IssuedCertificate) -> None:
        """Say once per expiring CA (not once per workload and renewal) that certificates end with it."""
        if issued.ca_not_after > issued.not_after + 1.0 or issued.ca_not_after == self._ca_expiry_warned:
            return
        self._ca_expiry_warned = issued.ca_not_after
        log.warning(
            "certificates are cut short by their CA's expiry: no renewal outlives it until the CA is rotated "
            "(docs/ca-rotation.md); renewals are spaced by at least the minimum refresh interval meanwhile",
            extra=kv(
                identity=str(issued.identity),
                ca_expiry=_iso(issued.ca_not_after),
                remaining_seconds=round(issued.ca_not_after - time.time()),
                min_refresh_interval=self.min_refresh_interval,
            ),
        )

    def _failed(self, entry: _Entry, priority: Priority, reason: str, message: str) -> None:
        self._errors.labels(reason).inc()
        if self._entries.get(entry.identity) is not entry:
            return
        entry.failures += 1
        entry.last_error = message
        now = time.time()
        if entry.cert is not None and not entry.valid(now):
            # The expiry gauge stays (in the past) so that an alert on it fires while nothing valid is held.
            log.error(
                "certificate expired without a renewal; the identity's connections are refused until one arrives",
                extra=kv(identity=str(entry.identity), expired=_iso(entry.cert.expires), error=message),
            )
            entry.cert = entry.server_ctx = entry.client_ctx = None
        delay = self.backoff.delay(entry.failures, self._rng)
        if entry.cert is not None:
            # As ztunnel: never retry later than the held certificate expires. Past its expiry, callers are refused
            # at once until the retry, which a backoff of minutes would otherwise hold back after the CA is back.
            delay = min(delay, entry.cert.expires - now)
        self._schedule(entry, now + delay, priority)
        log.warning(
            "certificate fetch failed",
            extra=kv(identity=str(entry.identity), reason=reason, error=message, retry_in=round(delay, 3)),
        )
        if not entry.valid(now):
            self._wake(entry, CertificateUnavailable(f"no certificate for {entry.identity}: {message}"))
        else:
            self._wake(entry, None)

    @staticmethod
    def _server_context(cert: IssuedCertificate, roots: Sequence[str]) -> ssl.SSLContext:
        """Built with the certificate (it also proves chain and key load); the client context waits for use.

        It issues no session tickets. With TLS 1.3 and OP_NO_TICKET, OpenSSL's tickets are stateful: the server
        caches a session per ticket (two per handshake), each pinning the client's certificate chain for up to two
        hours and 20,480 sessions per context, while HBONE clients pool long-lived connections and never resume.
        Measured: 1,000 accepted and closed connections left 2,000 cached sessions and ~27 MB that malloc could not
        give back; with no tickets, none."""
        ctx = tls.server_context(cert.chain_pem, cert.key_pem, roots, alpn=_ALPN)
        ctx.num_tickets = 0
        return ctx

    def _roots_changed(self, roots: tuple[str, ...]) -> None:
        """New bundle from the CA (rotation step): every context must trust exactly it from now on."""
        self._roots = roots
        self.signer.update_roots(roots)
        now = time.time()
        for entry in self._entries.values():
            if entry.cert is not None and entry.valid(now):
                try:
                    entry.server_ctx, entry.client_ctx = self._server_context(entry.cert, roots), None
                except (ssl.SSLError, OSError) as e:
                    log.error("rebuilding TLS context failed", extra=kv(identity=str(entry.identity), error=str(e)))
        log.info("trust bundle changed", extra=kv(roots=len(roots)))

    @staticmethod
    def _wake(entry: _Entry, error: Exception | None) -> None:
        waiters, entry.waiters = entry.waiters, []
        for w in waiters:
            if w.done():
                continue
            if error is None:
                w.set_result(None)
            else:
                w.set_exception(error)

    def _forget(self, entry: _Entry, why: str) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.queued = None
        entry.staged = None
        self._wake(entry, CertificateUnavailable(why))
        self._expiry.remove(str(entry.identity))
        self._chain_expiry.remove(str(entry.identity))
