"""CertificateManager against an in-process CA: on-demand and warm-up fetches, priorities, failures, rotation."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ca_client import CaRequestError
from agent.identity import (
    Backoff,
    CertificateManager,
    CertificateUnavailable,
    CertsDump,
    InvalidCertificateResponse,
    new_key_and_csr,
    parse_response,
)
from agent.prometheus import Registry
from common.spiffe import Identity
from controller import ca_rotation
from controller.ca import CertificateAuthority
from tests.support.identity_pki import csr_pem, handshake
from tests.support.waiting import eventually

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
DB = Identity(TD, "default", "db")
API = Identity(TD, "default", "api")
CACHE = Identity(TD, "default", "cache")
FAST = Backoff(initial=0.02, maximum=0.1)


class FakeSigner:
    """Signs with a real CA, in process; can be gated, made to fail, or to return tampered chains."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.calls: list[Identity] = []
        self.gate: asyncio.Event | None = None
        self.fail: CaRequestError | None = None
        self.tamper: Callable[[list[str], Identity], list[str]] | None = None
        self.root_updates: list[tuple[str, ...]] = []

    async def create_certificate(self, csr_pem: str, identity: Identity, ttl_seconds: int) -> list[str]:
        self.calls.append(identity)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        chain = self.ca.sign_csr(csr_pem, identity, ttl_seconds)
        return self.tamper(chain, identity) if self.tamper else chain

    def update_roots(self, roots_pem: Sequence[str]) -> None:
        self.root_updates.append(tuple(roots_pem))


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca", TD)


@pytest.fixture
def signer(ca: CertificateAuthority) -> FakeSigner:
    return FakeSigner(ca)


@pytest.fixture
async def registry() -> Registry:
    return Registry()


@pytest.fixture
async def manager(signer: FakeSigner, registry: Registry) -> AsyncIterator[CertificateManager]:
    m = CertificateManager(signer, TD, ttl_seconds=3600, registry=registry, backoff=FAST)
    yield m
    await m.close()


def row(m: CertificateManager, ident: Identity) -> CertsDump:
    return next(r for r in m.snapshot() if r["identity"] == str(ident))


async def test_on_demand_contexts_do_mutual_tls_with_spiffe_ids_and_h2(manager: CertificateManager) -> None:
    server_ctx = await manager.server_context(WEB)
    client_ctx = await manager.client_context(DB)
    seen_by_server, seen_by_client, alpn = handshake(server_ctx, client_ctx)
    assert (seen_by_server, seen_by_client, alpn) == (DB, WEB, "h2")
    assert server_ctx is await manager.server_context(WEB), "contexts are cached per identity"


async def test_prefetch_warms_without_a_caller(
    manager: CertificateManager, signer: FakeSigner, registry: Registry
) -> None:
    manager.prefetch([WEB, DB])
    await eventually(
        lambda: all(r["state"] == "Available" for r in manager.snapshot()) and len(manager.snapshot()) == 2
    )
    r = row(manager, WEB)
    cert = manager.certificate(WEB)
    assert cert is not None and r["certChain"][0]["serialNumber"] == str(cert.serial)
    assert registry.get_sample_value("ambit_cert_expiry_seconds", {"identity": str(WEB)}) == cert.not_after
    manager.prefetch([WEB])
    await asyncio.sleep(0.05)
    assert signer.calls.count(WEB) == 1, "prefetch of a valid certificate does nothing"


async def test_realtime_overtakes_warmup(ca: CertificateAuthority, registry: Registry) -> None:
    signer = FakeSigner(ca)
    signer.gate = asyncio.Event()
    m = CertificateManager(signer, TD, registry=registry, concurrency=1)
    try:
        m.prefetch([WEB, DB, API])
        await eventually(lambda: signer.calls == [WEB])  # the single worker is busy with WEB
        on_demand = asyncio.create_task(m.client_context(CACHE))
        await asyncio.sleep(0.01)
        signer.gate.set()
        await on_demand
        await eventually(lambda: len(signer.calls) == 4)
        assert signer.calls == [WEB, CACHE, DB, API]
    finally:
        await m.close()


async def test_failed_refresh_keeps_valid_certificate_then_recovers(
    ca: CertificateAuthority, registry: Registry
) -> None:
    signer = FakeSigner(ca)
    m = CertificateManager(signer, TD, ttl_seconds=2, registry=registry, backoff=FAST)
    try:
        ctx = await m.server_context(WEB)
        first = m.certificate(WEB)
        assert first is not None
        signer.fail = CaRequestError("unavailable", "UNAVAILABLE: controller down")
        await eventually(lambda: row(m, WEB)["lastError"] != "")
        assert await m.server_context(WEB) is ctx, "still-valid certificate keeps serving during retries"
        # As ztunnel: a held valid certificate is Available while its refresh fails; lastError says why.
        assert row(m, WEB)["state"] == "Available" and row(m, WEB)["certChain"]
        assert row(m, WEB)["lastError"] == "UNAVAILABLE: controller down"
        assert (registry.get_sample_value("ambit_cert_fetch_errors_total", {"reason": "unavailable"}) or 0) >= 1
        signer.fail = None
        await eventually(lambda: row(m, WEB)["state"] == "Available" and m.certificate(WEB) is not first)
        assert row(m, WEB)["lastError"] == ""
    finally:
        await m.close()


async def test_expired_certificate_is_dropped_when_refresh_keeps_failing(
    ca: CertificateAuthority, registry: Registry
) -> None:
    signer = FakeSigner(ca)
    m = CertificateManager(signer, TD, ttl_seconds=1, registry=registry, backoff=FAST)
    try:
        await m.server_context(WEB)
        held = m.certificate(WEB)
        assert held is not None
        signer.fail = CaRequestError("unavailable", "UNAVAILABLE: down")
        await eventually(lambda: m.certificate(WEB) is None)
        assert row(m, WEB)["certChain"] == [] and row(m, WEB)["rootCerts"] == []
        assert row(m, WEB)["state"] == "Unavailable: UNAVAILABLE: down"
        # The expiry stays exported (now in the past) so alerts on it fire.
        assert registry.get_sample_value("ambit_cert_expiry_seconds", {"identity": str(WEB)}) == held.not_after
        with pytest.raises(CertificateUnavailable, match="down"):
            await m.server_context(WEB)
    finally:
        await m.close()


async def test_retry_after_failed_refresh_comes_no_later_than_expiry(
    ca: CertificateAuthority, registry: Registry
) -> None:
    """A failed refresh used to wait out its whole backoff even when the held certificate expired first: from the
    expiry on every connection was refused at once, for up to the backoff (minutes), even with the CA back."""
    signer = FakeSigner(ca)
    # 4 s: refresh at 2 s, expiry at 4 s, room for a slow machine between the failed refresh and the expiry.
    m = CertificateManager(signer, TD, ttl_seconds=4, registry=registry, backoff=Backoff(initial=120, maximum=120))
    try:
        await m.server_context(WEB)
        first = m.certificate(WEB)
        assert first is not None
        signer.fail = CaRequestError("unavailable", "UNAVAILABLE: controller down")
        await eventually(lambda: row(m, WEB)["lastError"] != "")
        signer.fail = None  # the CA is back; the next retry must come by the expiry, not 120 s later
        await eventually(lambda: getattr(m.certificate(WEB), "serial", first.serial) != first.serial, "a renewal")
        assert signer.calls == [WEB, WEB, WEB]
    finally:
        await m.close()


async def test_refused_on_demand_raises_with_reason(manager: CertificateManager, signer: FakeSigner) -> None:
    signer.fail = CaRequestError("permission_denied", "PERMISSION_DENIED: node node1 runs no pod default/web")
    with pytest.raises(CertificateUnavailable, match="runs no pod"):
        await manager.client_context(WEB)
    calls = len(signer.calls)
    with pytest.raises(CertificateUnavailable, match="runs no pod"):
        await manager.client_context(WEB)  # in backoff: fails fast, no extra CA call
    assert len(signer.calls) == calls
    assert row(manager, WEB)["state"] == "Unavailable: PERMISSION_DENIED: node node1 runs no pod default/web"


async def test_retain_only_drops_departed_workloads(
    manager: CertificateManager, signer: FakeSigner, registry: Registry
) -> None:
    await manager.server_context(WEB)
    await manager.server_context(DB)
    signer.gate = asyncio.Event()
    waiting = asyncio.create_task(manager.server_context(API))
    await eventually(lambda: API in signer.calls)
    manager.retain_only([WEB])
    assert [r["identity"] for r in manager.snapshot()] == [str(WEB)]
    assert registry.get_sample_value("ambit_cert_expiry_seconds", {"identity": str(DB)}) is None
    with pytest.raises(CertificateUnavailable, match="no longer runs on this node"):
        await waiting
    signer.gate.set()
    await asyncio.sleep(0.05)
    assert manager.certificate(API) is None, "a fetch finishing after the workload left is discarded"


@pytest.mark.parametrize("tamper", ["other_identity", "other_key", "no_root", "garbage", "foreign_root"])
async def test_invalid_responses_are_rejected(
    tmp_path: Path, ca: CertificateAuthority, registry: Registry, tamper: str
) -> None:
    foreign = CertificateAuthority(tmp_path / "foreign", TD)
    tampers: dict[str, Callable[[list[str], Identity], list[str]]] = {
        "other_identity": lambda chain, ident: ca.sign_csr(csr_pem(), Identity(TD, "default", "x"), 60),
        "other_key": lambda chain, ident: ca.sign_csr(csr_pem(), ident, 60),
        "no_root": lambda chain, ident: chain[:1],
        "garbage": lambda chain, ident: ["junk", *chain[1:]],
        "foreign_root": lambda chain, ident: [chain[0], *foreign.roots_pem()],
    }
    signer = FakeSigner(ca)
    signer.tamper = tampers[tamper]
    m = CertificateManager(signer, TD, registry=registry, backoff=FAST)
    try:
        with pytest.raises(CertificateUnavailable):
            await m.server_context(WEB)
        errors = registry.get_sample_value("ambit_cert_fetch_errors_total", {"reason": "invalid_response"})
        assert (errors or 0) >= 1
    finally:
        await m.close()


def test_parse_response_splits_presented_chain_and_bundle(ca: CertificateAuthority) -> None:
    key, csr = new_key_and_csr(WEB)
    issued = parse_response(ca.sign_csr(csr, WEB, 60), WEB, key, time.time())
    assert issued.chain_pem.count("BEGIN CERTIFICATE") == 1
    assert list(issued.roots_pem) == ca.roots_pem()
    assert issued.not_before < time.time() < issued.refresh_at < issued.not_after
    with pytest.raises(InvalidCertificateResponse, match="not for the key"):
        parse_response(ca.sign_csr(csr, WEB, 60), WEB, ec.generate_private_key(ec.SECP256R1()), time.time())


async def test_new_bundle_rebuilds_contexts_and_updates_ca_channel(
    ca: CertificateAuthority, registry: Registry
) -> None:
    signer = FakeSigner(ca)
    m = CertificateManager(signer, TD, ttl_seconds=2, registry=registry, backoff=FAST)
    try:
        old_ctx = await m.server_context(WEB)
        assert len(m.roots()) == 1
        ca_rotation.add_root(ca.directory, TD)
        ca.reload_if_changed(force=True)
        await eventually(lambda: len(m.roots()) == 2)
        assert signer.root_updates[-1] == tuple(m.roots())
        assert await m.server_context(WEB) is not old_ctx
    finally:
        await m.close()


async def test_handshake_fails_across_unrelated_roots(tmp_path: Path, registry: Registry) -> None:
    a = CertificateManager(FakeSigner(CertificateAuthority(tmp_path / "a", TD)), TD, registry=registry)
    b = CertificateManager(FakeSigner(CertificateAuthority(tmp_path / "b", TD)), TD, registry=Registry())
    try:
        with pytest.raises(ssl.SSLError):
            handshake(await a.server_context(WEB), await b.client_context(DB))
    finally:
        await a.close()
        await b.close()


async def test_unexpected_signer_error_fails_waiters_and_retries(ca: CertificateAuthority, registry: Registry) -> None:
    class Flaky(FakeSigner):
        async def create_certificate(self, csr_pem: str, identity: Identity, ttl_seconds: int) -> list[str]:
            if not self.calls:
                self.calls.append(identity)
                raise RuntimeError("client bug")
            return await super().create_certificate(csr_pem, identity, ttl_seconds)

    m = CertificateManager(Flaky(ca), TD, registry=registry, backoff=FAST)
    try:
        with pytest.raises(CertificateUnavailable, match="RuntimeError: client bug"):
            await m.server_context(WEB)
        assert registry.get_sample_value("ambit_cert_fetch_errors_total", {"reason": "internal"}) == 1
        await eventually(lambda: m.certificate(WEB) is not None)
    finally:
        await m.close()
