"""A CA whose clock differs from the agent's: real certificates with a shifted validity window, real handshakes."""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.ca_client import CaClient
from agent.identity import CertificateManager
from agent.prometheus import Registry
from common.spiffe import Identity
from controller import ca as ca_module
from controller.ca import CLOCK_SKEW_SECONDS, CertificateAuthority
from tests.support.ca_service import ca_service
from tests.support.identity_pki import CaSigner, csr_pem, handshake
from tests.support.waiting import eventually

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
DB = Identity(TD, "default", "db")


class ShiftedClock:
    """The CA's clock, ``offset`` seconds from the real one (the certificates it signs are shifted with it)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._real: Callable[[], datetime.datetime] = ca_module._now

    def __call__(self) -> datetime.datetime:
        return self._real() + datetime.timedelta(seconds=self.offset)


@pytest.fixture
def ca_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[ShiftedClock]:
    clock = ShiftedClock()
    monkeypatch.setattr(ca_module, "_now", clock)
    yield clock


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_a_renewal_not_valid_yet_waits_for_its_not_before_while_the_current_one_serves(
    tmp_path: Path, ca_clock: ShiftedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The controller's clock jumps 122.5 s ahead of the nodes': the CA backdates by 2 minutes, so a renewal
    becomes valid 1.5 to 2.5 s (notBefore has whole seconds) after it arrives. Put in service at once, every peer
    with the nodes' clock refused it ("certificate is not yet valid") at each renewal until then. The agent keeps
    presenting the current certificate, swaps when the renewal is valid by its own clock, and asks the CA nothing
    more meanwhile."""
    ca = CertificateAuthority(tmp_path / "ca", TD)
    web_signer = CaSigner(ca)
    registry = Registry()
    web = CertificateManager(web_signer, TD, ttl_seconds=8, registry=registry)
    peer = CertificateManager(CaSigner(ca), TD, ttl_seconds=3600, registry=Registry())
    try:
        await web.server_context(WEB)
        first = web.certificate(WEB)
        assert first is not None
        peer_client = await peer.client_context(DB)
        handshake(await web.server_context(WEB), peer_client)

        ca_clock.offset = CLOCK_SKEW_SECONDS + 2.5
        with caplog.at_level(logging.WARNING, logger="ambit.identity"):
            await eventually(lambda: web_signer.calls == 2, "the renewal at half-life (4 s)")
            staged = web._entries[WEB].staged
            assert staged is not None, "the renewal waits"
            assert web.certificate(WEB) is first
            # A peer on the nodes' clock accepts what is presented now, and would refuse the renewal.
            assert handshake(await web.server_context(WEB), peer_client)[0] == DB
            with pytest.raises(ssl.SSLError, match="not yet valid"):
                handshake(web._server_context(staged, web.roots()), peer_client)
            ahead = registry.get_sample_value("ambit_cert_not_before_ahead_seconds")
            assert ahead is not None and 0 < ahead <= 2.5

            await eventually(lambda: web.certificate(WEB) is staged, "the swap at the renewal's notBefore")
            assert handshake(await web.server_context(WEB), peer_client)[0] == DB
        assert web_signer.calls == 2, "no request while the renewal waited"
        assert len(messages(caplog, "not valid yet by this node's clock; the current one serves")) == 1
    finally:
        await web.close()
        await peer.close()


async def test_a_first_certificate_not_valid_yet_serves_at_once_and_says_why(
    tmp_path: Path, ca_clock: ShiftedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing held, waiting would only refuse the workload's connections here as well; the certificate is
    used, and the log and a gauge say that peers with this node's clock refuse it until its notBefore."""
    ca_clock.offset = CLOCK_SKEW_SECONDS + 30
    registry = Registry()
    m = CertificateManager(CaSigner(CertificateAuthority(tmp_path / "ca", TD)), TD, registry=registry)
    try:
        with caplog.at_level(logging.WARNING, logger="ambit.identity"):
            await m.server_context(WEB)
        held = m.certificate(WEB)
        row = m.snapshot()[0]
    finally:
        await m.close()
    assert held is not None and row["state"] == "Available"
    assert len(messages(caplog, "peers with clocks like this node's refuse it")) == 1
    ahead = registry.get_sample_value("ambit_cert_not_before_ahead_seconds")
    assert ahead is not None and 25 < ahead <= 30


@pytest.mark.parametrize("offset", [-3600.0, 3600.0])
async def test_renewal_is_timed_by_the_agents_clock(tmp_path: Path, ca_clock: ShiftedClock, offset: float) -> None:
    """Half of the time the certificate is valid by this node's clock, whichever way the CA's runs: an hour behind
    (the certificate has an hour less than its TTL left here) or ahead (it becomes valid only in an hour)."""
    ca_clock.offset = offset
    ttl = 4 * 3600
    m = CertificateManager(
        CaSigner(CertificateAuthority(tmp_path / "ca", TD)), TD, ttl_seconds=ttl, registry=Registry()
    )
    try:
        await m.server_context(WEB)
        held = m.certificate(WEB)
    finally:
        await m.close()
    assert held is not None
    now = datetime.datetime.now(datetime.UTC).timestamp()
    usable_from = max(held.not_before, now)
    half = usable_from + (held.expires - usable_from) / 2
    assert abs(held.refresh_at - half) <= 0.01 * ttl + 5
    assert now < held.refresh_at < held.expires


async def test_an_agent_behind_the_controller_gets_certificates_right_after_the_controller_starts(
    tmp_path: Path, ca_clock: ShiftedClock
) -> None:
    """The agent verifies the controller with its own clock. A controller 10 minutes ahead that had just minted its
    root and serving certificate, both backdated only 2 minutes, was "not yet valid" to that agent for 8 minutes:
    no certificates, no config. The CA's own certificates are backdated an hour; the request goes through over
    real gRPC TLS, verified by OpenSSL at the real time."""
    ca_clock.offset = 600.0
    ca = CertificateAuthority(tmp_path / "ca", TD)
    async with ca_service(ca, tmp_path) as (address, token_file):
        client = CaClient(address, token_file=token_file, root_cert_file=tmp_path / "ca" / "root-cert.pem")
        try:
            chain = await client.create_certificate(csr_pem(), WEB, 3600)
        finally:
            await client.close()
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.not_valid_before_utc > datetime.datetime.now(datetime.UTC), "the leaf itself is not valid yet here"
