"""The agent's per-workload server contexts keep no TLS sessions: every accepted HBONE handshake would otherwise
leave cached sessions (each pinning the client's certificate chain) in the context for hours."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.identity import CertificateManager
from agent.prometheus import Registry
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support.identity_pki import handshake
from tests.unit.test_identity_manager import FakeSigner

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
DB = Identity(TD, "default", "db")


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[CertificateManager]:
    m = CertificateManager(FakeSigner(CertificateAuthority(tmp_path / "ca", TD)), TD, registry=Registry())
    yield m
    await m.close()


async def test_accepted_handshakes_leave_no_cached_sessions(manager: CertificateManager) -> None:
    server_ctx = await manager.server_context(WEB)
    client_ctx = await manager.client_context(DB)
    for _ in range(5):
        assert handshake(server_ctx, client_ctx)[:2] == (DB, WEB)
    stats = server_ctx.session_stats()
    assert stats["accept_good"] == 5
    assert stats["number"] == 0  # OpenSSL's default (two stateful tickets per handshake) would hold 10


async def test_client_context_is_built_once_on_first_use(manager: CertificateManager) -> None:
    first = await manager.client_context(DB)
    assert first is await manager.client_context(DB)
    assert handshake(await manager.server_context(WEB), first)[:2] == (DB, WEB)
