"""Certificates near the CA's own expiry: lifetimes cut to the chain, renewals that stay spaced, and saying so."""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from agent import identity
from agent.ca_client import CaRequestError
from agent.identity import LAPSE_RETRY_SECONDS, CertificateManager, next_refresh
from agent.prometheus import Registry
from common.pki import cert_pem
from common.spiffe import Identity
from controller.ca import CaError, CaLoadError, CertificateAuthority, key_pem
from controller.ca_service import CertificateService, _ServingCertificate
from controller.node_auth import NodeTokenAuthenticator
from tests.support.identity_pki import csr_pem
from tests.support.waiting import eventually

TD = "cluster.local"
DAY = 24 * 3600
WEB = Identity(TD, "default", "web")


def _ca_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    lifetime: float,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )


def write_ca(directory: Path, root_life: float, intermediate_life: float | None = None) -> x509.Certificate:
    """A CA in Istio's layout whose root (and intermediate, when given) expire after the given seconds; returns
    the signing certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("test root", root_key, root_life)
    signing, signing_key = root, root_key
    if intermediate_life is not None:
        signing_key = ec.generate_private_key(ec.SECP256R1())
        signing = _ca_cert("test intermediate", signing_key, intermediate_life, (root, root_key))
        (directory / "cert-chain.pem").write_text(cert_pem(signing) + cert_pem(root))
    (directory / "ca-key.pem").write_bytes(key_pem(signing_key))
    (directory / "ca-cert.pem").write_text(cert_pem(signing))
    (directory / "root-cert.pem").write_text(cert_pem(root))
    return signing


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a log line (common.log.kv)."""
    return dict(getattr(record, "fields", {}))


def leaf_not_after(chain: Sequence[str]) -> float:
    return x509.load_pem_x509_certificate(chain[0].encode()).not_valid_after_utc.timestamp()


# -- the CA ----------------------------------------------------------------------------------------------------------


def test_a_leaf_never_outlives_the_root_its_intermediate_chains_to(tmp_path: Path) -> None:
    """Peers check every certificate of the chain, so a leaf is dead when the first of them expires. The CA cut
    leaves to its signing certificate only: under a plugged-in intermediate that outlives its root (an operator's
    PKI renewing the root late) leaves claimed a day of life the root did not have."""
    write_ca(tmp_path / "ca", root_life=3600, intermediate_life=30 * DAY)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    root = x509.load_pem_x509_certificate(ca.roots_pem()[0].encode())
    chain = ca.sign_csr(csr_pem(), WEB, DAY)
    assert leaf_not_after(chain) == root.not_valid_after_utc.timestamp()
    assert ca.chain_expiry() == root.not_valid_after_utc.timestamp()


def test_a_directory_whose_chain_has_expired_is_refused_by_name(tmp_path: Path) -> None:
    """An expired root under a valid intermediate can sign nothing peers accept: refused at load, naming the file
    (a reload of it would keep the last good CA), rather than failing every request afterwards."""
    write_ca(tmp_path / "ca", root_life=-60, intermediate_life=30 * DAY)
    with pytest.raises(CaLoadError, match=r"root-cert.pem: CN=test root, which .*ca-cert.pem chains through, expired"):
        CertificateAuthority(tmp_path / "ca", TD)


def test_the_ca_says_once_per_state_that_it_cuts_certificates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_ca(tmp_path / "ca", root_life=3600)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    with caplog.at_level(logging.WARNING, logger="ambit.ca"):
        for _ in range(5):
            ca.sign_csr(csr_pem(), WEB, DAY)
        ca.sign_csr(csr_pem(), WEB, 600)  # not cut: no word about it
    warnings = [r for r in caplog.records if "certificates are cut to its expiry" in r.getMessage()]
    assert len(warnings) == 1
    assert fields(warnings[0])["remaining_seconds"] > 3500


def test_chain_expiry_is_exported_under_istios_name(tmp_path: Path) -> None:
    signing = write_ca(tmp_path / "ca", root_life=30 * DAY, intermediate_life=7 * DAY)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"node1": "secret"}')
    registry = CollectorRegistry()

    class NoPods:
        def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
            return False

    CertificateService(ca, NoPods(), NodeTokenAuthenticator(tokens), registry)
    exported = registry.get_sample_value("citadel_server_cert_chain_expiry_timestamp")
    assert exported == signing.not_valid_after_utc.timestamp()


async def test_the_controllers_serving_certificate_is_not_reissued_at_every_handshake_near_ca_expiry(
    tmp_path: Path,
) -> None:
    """gRPC asks for the serving certificate before each handshake; it was re-issued at half of its life, and a
    certificate cut to an expiring CA has half the life of the last one each time: in the CA's last seconds a
    re-issue (a key generation and a signature) at nearly every handshake. Once a re-issue brings no later
    expiry, the next one waits for that expiry (or for the CA to change)."""
    write_ca(tmp_path / "ca", root_life=2.5)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    serving = _ServingCertificate(ca, ["localhost"], ["127.0.0.1"], DAY)
    reissued = 0
    deadline = ca.chain_expiry() - 0.1
    while time.time() < deadline:
        if serving.fetch() is not None:
            reissued += 1
        await asyncio.sleep(0.005)
    assert reissued == 1, f"re-issued {reissued} times in the CA's last 2.5 s"


# -- the agent's schedule (pure) -------------------------------------------------------------------------------------


def renewals_until(ca_expiry: float, ttl: float, min_interval: float, rng: random.Random) -> list[float]:
    """Times of the renewals an agent schedules against a CA that cuts every certificate to ``ca_expiry``, each
    fetched the moment it is due, starting at 0."""
    now, times, previous = 0.0, [], None
    while now < ca_expiry:
        expires = min(now + ttl, ca_expiry)
        at = next_refresh(
            now - 120, expires, now, min_interval=min_interval, jitter=0.01, rng=rng, previous_expires=previous
        )
        assert now <= at <= expires + LAPSE_RETRY_SECONDS[1]
        times.append(at)
        now, previous = at, expires
    return times


def test_renewals_against_an_expiring_ca_stay_spaced_and_end_at_its_expiry() -> None:
    """24 h certificates from a CA with a day left: at half-life alone each certificate is renewed when half of
    what the CA has left is gone, halving down to the fetch's latency (this simulation, with instant fetches,
    never stops). With the floor (1/16 of the TTL) renewals are at least 90 minutes apart, the last chance to
    move to a rotated CA comes before the expiry, and the one after it is due just after the expiry (where the
    backoff takes over)."""
    rng = random.Random(7)
    floor = DAY / 16
    times = renewals_until(DAY, DAY, floor, rng)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert DAY + LAPSE_RETRY_SECONDS[0] <= times[-1] <= DAY + LAPSE_RETRY_SECONDS[1]
    assert len(times) <= 6, times
    assert all(g >= floor for g in gaps[:-2]), gaps
    assert times[-2] < DAY, "a renewal before the expiry, to pick up a CA rotated meanwhile"
    half_life_only = renewals_until(DAY, DAY, 0.0, random.Random(7))
    assert len(half_life_only) > 15, "the storm the floor prevents (checks this simulation can tell)"


def test_the_floor_leaves_ordinary_renewals_at_half_life() -> None:
    rng = random.Random(3)
    for _ in range(200):
        at = next_refresh(1000 - 120, 1000 + DAY, 1000, min_interval=DAY / 16, jitter=0.01, rng=rng)
        assert abs(at - (1000 + DAY / 2)) <= 0.01 * DAY + 121


def test_a_renewal_the_ca_could_not_lengthen_is_next_due_at_expiry() -> None:
    rng = random.Random(1)
    lapse = [
        next_refresh(0, 500, 100, min_interval=5400, jitter=0.01, rng=rng, previous_expires=500) for _ in range(50)
    ]
    assert all(500 + LAPSE_RETRY_SECONDS[0] <= at <= 500 + LAPSE_RETRY_SECONDS[1] for at in lapse)
    assert max(lapse) - min(lapse) > 5, "a fleet lapsing together does not come back at one instant"
    first = next_refresh(0, 500, 100, min_interval=5400, jitter=0.01, rng=random.Random(1))
    assert 100 + 0.5 * 400 <= first <= 100 + 0.9 * 400


# -- the agent, against a real CA about to expire ---------------------------------------------------------------------


class CountingSigner:
    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.issued: list[Identity] = []
        self.refused = 0

    async def create_certificate(self, csr: str, identity: Identity, ttl_seconds: int) -> list[str]:
        try:
            chain = self.ca.sign_csr(csr, identity, ttl_seconds)
        except CaError as e:  # as the CA service answers it
            self.refused += 1
            raise CaRequestError("internal", f"INTERNAL: CA failed to sign: {e}") from None
        self.issued.append(identity)
        return chain

    def update_roots(self, roots_pem: Sequence[str]) -> None:
        pass


async def test_an_agent_renews_twice_before_its_ca_expires_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA with 4 s left and 24 h certificates: at half-life an agent renewed each workload's certificate about
    ten times in those seconds (measured: 8.2 per workload over a CA's last 20 s, 64 of 164 in the last second).
    Now: the first certificate, one last-chance renewal, then the certificates lapse with the CA and the lapse is
    an error; the CA's expiry is a warning once and a gauge per identity."""
    monkeypatch.setattr(identity, "LAPSE_RETRY_SECONDS", (1.0, 1.5))  # the fleet's spread, for one agent
    write_ca(tmp_path / "ca", root_life=4)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    signer = CountingSigner(ca)
    registry = Registry()
    m = CertificateManager(signer, TD, ttl_seconds=DAY, registry=registry)
    idents = [Identity(TD, "default", f"sa{i}") for i in range(5)]
    try:
        with caplog.at_level(logging.INFO, logger="ambit.identity"):
            for ident in idents:
                await m.server_context(ident)
            await eventually(lambda: all(r["lastError"] for r in m.snapshot()), "every renewal refused by the CA")
    finally:
        await m.close()
    assert sorted(signer.issued, key=str) == sorted(idents * 2, key=str)
    cut = [r for r in caplog.records if "cut short by their CA's expiry" in r.getMessage()]
    assert len(cut) == 1
    lapsed = [r for r in caplog.records if r.levelno == logging.ERROR and "expired without a renewal" in r.getMessage()]
    assert {fields(r)["identity"] for r in lapsed} == {str(i) for i in idents}


async def test_chain_expiry_gauge_and_refresh_follow_the_ca_not_only_the_leaf(tmp_path: Path) -> None:
    """istiod signs the requested TTL past its own expiry (ca.go sign: only the default TTL is cut, at start); a
    leaf outliving its CA is refused by peers from the CA's expiry on. The agent counts a certificate valid only
    while its whole chain is, so it renews before the CA lapses and exports when that is."""
    signing = write_ca(tmp_path / "ca", root_life=30 * DAY, intermediate_life=2 * 3600)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    ca_expiry = signing.not_valid_after_utc.timestamp()
    loaded = serialization.load_pem_private_key((tmp_path / "ca" / "ca-key.pem").read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    signing_key: ec.EllipticCurvePrivateKey = loaded

    class IstiodLike(CountingSigner):
        """Signs like istiod: NotAfter = now + TTL whatever the CA's own expiry."""

        async def create_certificate(self, csr: str, identity: Identity, ttl_seconds: int) -> list[str]:
            chain = self.ca.sign_csr(csr, identity, 600)
            leaf = x509.load_pem_x509_certificate(chain[0].encode())
            now = datetime.datetime.now(datetime.UTC)
            builder = (
                x509.CertificateBuilder()
                .subject_name(leaf.subject)
                .issuer_name(leaf.issuer)
                .public_key(leaf.public_key())
                .serial_number(leaf.serial_number)
                .not_valid_before(now - datetime.timedelta(minutes=2))
                .not_valid_after(now + datetime.timedelta(seconds=ttl_seconds))
            )
            for ext in leaf.extensions:
                builder = builder.add_extension(ext.value, critical=ext.critical)
            return [cert_pem(builder.sign(signing_key, hashes.SHA256())), *chain[1:]]

    registry = Registry()
    m = CertificateManager(IstiodLike(ca), TD, ttl_seconds=DAY, registry=registry)
    labels = {"identity": str(WEB)}
    try:
        await m.server_context(WEB)
        held = m.certificate(WEB)
        exported = [
            registry.get_sample_value(n, labels)
            for n in ("ambit_cert_expiry_seconds", "ambit_cert_chain_expiry_seconds")
        ]
    finally:
        await m.close()
    assert held is not None
    assert held.not_after > ca_expiry + 20 * 3600, "the leaf itself claims a day"
    assert held.expires == held.ca_not_after == ca_expiry
    assert held.refresh_at < ca_expiry
    assert exported == [ca_expiry, ca_expiry]
