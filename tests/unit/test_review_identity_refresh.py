"""Refresh timing across many workloads: certificates fetched together must not all be renewed at one instant."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest

from agent.ca_client import CaRequestError
from agent.identity import Backoff, CertificateManager, IssuedCertificate
from agent.prometheus import Registry
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support.identity_pki import CaSigner
from tests.support.waiting import eventually

TD = "cluster.local"
TTL = 3600


async def test_certificates_fetched_together_are_refreshed_spread_around_half_life(tmp_path: Path) -> None:
    """An agent (or a whole cluster) that starts at once fetches every certificate within seconds; refreshing each
    at exactly half its life renews them all again at one instant every TTL/2, forever: the herd the CA sees at a
    cluster start comes back twice a day. As Istio's agent (SECRET_GRACE_PERIOD_RATIO_JITTER 0.01), each refresh
    is moved by up to 1 % of the lifetime either way, so such a fleet spreads out and stays spread."""
    ca = CertificateAuthority(tmp_path / "ca", TD)
    m = CertificateManager(CaSigner(ca), TD, ttl_seconds=TTL, registry=Registry(), rng=random.Random(5))
    idents = [Identity(TD, "default", f"sa{i}") for i in range(40)]
    try:
        started = time.time()
        for ident in idents:
            await m.server_context(ident)
        certs = [m.certificate(i) for i in idents]
    finally:
        await m.close()
    issued = [c for c in certs if isinstance(c, IssuedCertificate)]
    assert len(issued) == len(idents)
    for c in issued:
        start = max(c.not_before, started)
        life = c.not_after - start
        assert 0.49 * life - 1 <= c.refresh_at - start <= 0.51 * life + 1, "refresh stays near half-life"
    times = sorted(c.refresh_at for c in issued)
    assert times[-1] - times[0] > 0.005 * TTL, f"40 refreshes within {times[-1] - times[0]:.3f} s of each other"


async def test_client_context_is_one_object_per_certificate_and_bundle(tmp_path: Path) -> None:
    """What a connection pool can key its connections by: the same context object while the certificate and the
    trust bundle stay, a new one as soon as either changes (so a rotated certificate can stop taking new streams)."""
    ca = CertificateAuthority(tmp_path / "ca", TD)
    m = CertificateManager(CaSigner(ca), TD, ttl_seconds=2, registry=Registry())
    ident = Identity(TD, "default", "web")
    try:
        first = await m.client_context(ident)
        serial = getattr(m.certificate(ident), "serial", None)
        assert await m.client_context(ident) is first
        await eventually(lambda: getattr(m.certificate(ident), "serial", None) != serial, "the refresh at ~1 s")
        assert await m.client_context(ident) is not first
    finally:
        await m.close()


class Down(CaSigner):
    """Signs once, then the CA is unreachable."""

    def __init__(self, ca: CertificateAuthority) -> None:
        super().__init__(ca)
        self.signed = 0

    async def create_certificate(self, csr_pem: str, identity: Identity, ttl_seconds: int) -> list[str]:
        if self.signed:
            raise CaRequestError("unavailable", "UNAVAILABLE: controller down")
        self.signed += 1
        return await super().create_certificate(csr_pem, identity, ttl_seconds)


async def test_expiry_without_renewal_is_logged_as_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Until the expiry, failed refreshes are warnings with the old certificate still serving; from the expiry on
    the identity's connections are refused, which an operator must hear about as such, once, at error level."""
    ca = CertificateAuthority(tmp_path / "ca", TD)
    m = CertificateManager(Down(ca), TD, ttl_seconds=1, registry=Registry(), backoff=Backoff(0.05, maximum=0.2))
    ident = Identity(TD, "default", "web")
    try:
        await m.server_context(ident)
        with caplog.at_level(logging.WARNING, logger="ambit.identity"):
            await eventually(lambda: m.certificate(ident) is None, "the expired certificate dropped")
            await eventually(lambda: sum(r.message == "certificate fetch failed" for r in caplog.records) > 3)
    finally:
        await m.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.message.split(";")[0] for r in errors] == ["certificate expired without a renewal"]
