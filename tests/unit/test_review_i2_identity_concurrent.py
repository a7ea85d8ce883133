"""Guards (pass, no bug found): one identity asked for at once by the inbound side (server context) and the
outbound side (client context) costs one CA call, whose outcome, certificate or error, reaches both; a workload
that leaves and comes back while its fetch is in flight ends with a certificate. As ztunnel's SecretManager
(src/identity/manager.rs: start_fetch shares the identity's watch channel, every waiter reads the fetch's
CertState, and a Forget during a fetch drops its result)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.ca_client import CaRequestError
from agent.identity import Backoff, CertificateManager, CertificateUnavailable
from agent.prometheus import Registry
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support.identity_pki import handshake
from tests.support.waiting import eventually
from tests.unit.test_identity_manager import FakeSigner

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
DB = Identity(TD, "default", "db")


@pytest.fixture
def signer(tmp_path: Path) -> FakeSigner:
    return FakeSigner(CertificateAuthority(tmp_path / "ca", TD))


async def test_inbound_and_outbound_asking_at_once_share_one_fetch(signer: FakeSigner) -> None:
    m = CertificateManager(signer, TD, registry=Registry())
    try:
        signer.gate = asyncio.Event()
        inbound = asyncio.create_task(m.server_context(WEB))
        outbound = asyncio.create_task(m.client_context(WEB))
        await eventually(lambda: signer.calls == [WEB], "the one fetch")
        for _ in range(5):
            await asyncio.sleep(0)
        assert not inbound.done() and not outbound.done()
        signer.gate.set()
        server_ctx, client_ctx = await asyncio.gather(inbound, outbound)
        assert signer.calls == [WEB]
        assert handshake(server_ctx, client_ctx)[:2] == (WEB, WEB)
    finally:
        await m.close()


async def test_a_failed_fetch_fails_both_sides_waiting_for_it(signer: FakeSigner) -> None:
    m = CertificateManager(signer, TD, registry=Registry(), backoff=Backoff(initial=30.0, jitter=0.0))
    try:
        signer.gate = asyncio.Event()
        signer.fail = CaRequestError("unavailable", "UNAVAILABLE: token review failed")
        inbound = asyncio.create_task(m.server_context(WEB))
        outbound = asyncio.create_task(m.client_context(WEB))
        await eventually(lambda: signer.calls == [WEB], "the one fetch")
        signer.gate.set()
        results = await asyncio.gather(inbound, outbound, return_exceptions=True)
        assert [type(r) for r in results] == [CertificateUnavailable, CertificateUnavailable]
        assert all("token review failed" in str(r) for r in results)
        assert signer.calls == [WEB], "no retry before the backoff"
    finally:
        await m.close()


async def test_a_workload_that_leaves_and_returns_during_its_fetch_gets_a_certificate(signer: FakeSigner) -> None:
    m = CertificateManager(signer, TD, registry=Registry())
    try:
        signer.gate = asyncio.Event()
        m.prefetch([WEB, DB])
        await eventually(lambda: len(signer.calls) == 2, "both fetches")
        m.retain_only([DB])
        m.prefetch([WEB, DB])
        waiting = asyncio.create_task(m.server_context(WEB))
        signer.gate.set()
        await waiting
        held = m.certificate(WEB)
        assert held is not None and m.snapshot()[1]["state"] == "Available"
        assert handshake(await m.server_context(WEB), await m.client_context(DB))[:2] == (DB, WEB)
    finally:
        await m.close()
