"""What an agent trusts across its own restart: the roots it learned die with it (as ztunnel's); --root-cert, which
the controller keeps current, is what a restarted agent starts from."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ca_client import CaClient, CaRequestError
from agent.identity import CertificateManager
from agent.prometheus import Registry
from common.spiffe import Identity
from controller import ca_rotation
from controller.ca import CertificateAuthority
from tests.support.ca_service import ca_service
from tests.support.identity_pki import csr_pem

TD = "cluster.local"
WEB = Identity(TD, "default", "web")


@dataclass
class Controller:
    ca: CertificateAuthority
    ca_dir: Path
    address: str
    token_file: Path


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """The CA service over gRPC TLS on 127.0.0.1, with the serving certificate re-issued when the CA changes."""
    ca = CertificateAuthority(tmp_path / "ca", TD)
    async with ca_service(ca, tmp_path) as (address, token_file):
        yield Controller(ca, tmp_path / "ca", address, token_file)


def rotate(c: Controller, step: str) -> None:
    getattr(ca_rotation, step)(c.ca_dir, *([TD] if step == "add_root" else []))
    assert c.ca.reload_if_changed(force=True)


async def test_after_a_rotation_a_restarted_agent_trusts_its_root_file_and_nothing_it_learned_before(
    controller: Controller, tmp_path: Path
) -> None:
    """An agent started with a root file holding the first root learns the two-root bundle from the CA during the
    rotation and keeps reaching the controller after `activate` and `retire` through it. Restarted with the same,
    never updated, file it has nothing but that file: the controller's new serving chain is refused, which is the
    outage docs/ca-rotation.md's "update --root-cert" step prevents. Restarted with the file as the controller
    publishes it (its bundle: the ConfigMap, or the lab's CA directory) it works at once. A bundle kept on disk
    across restarts would have hidden the stale file and, after a `retire`, brought the retired root back."""
    stale = tmp_path / "old-root.pem"
    shutil.copy(controller.ca_dir / "root-cert.pem", stale)
    before = CaClient(controller.address, token_file=controller.token_file, root_cert_file=stale)
    certs = CertificateManager(before, TD, ttl_seconds=3600, registry=Registry())
    try:
        rotate(controller, "add_root")
        await certs.server_context(WEB)  # learns both roots
        assert len(certs.roots()) == 2
        rotate(controller, "activate")
        rotate(controller, "retire")
        before.channel.retire()  # a fresh TLS handshake: the controller now serves a new-root certificate
        chain = await before.create_certificate(csr_pem(), WEB, 600)
        assert chain, "the running agent's learned bundle carries it across the rotation"
    finally:
        await certs.close()
        await before.close()

    restarted = CaClient(controller.address, token_file=controller.token_file, root_cert_file=stale)
    try:
        with pytest.raises(CaRequestError, match="certificate verify failed"):
            await restarted.create_certificate(csr_pem(), WEB, 600)
    finally:
        await restarted.close()

    published = CaClient(
        controller.address, token_file=controller.token_file, root_cert_file=controller.ca_dir / "root-cert.pem"
    )
    try:
        assert await published.create_certificate(csr_pem(), WEB, 600)
    finally:
        await published.close()
