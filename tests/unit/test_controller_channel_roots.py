"""The controller channel keeps its connection when the CA's bundle only adds trust, and retires it when a root it
had learned is dropped (a rotation's end): new calls then verify against what the bundle now says."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.ca_client import CaClient
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support.ca_service import ca_service, count_controller_connects
from tests.support.identity_pki import csr_pem

TD = "cluster.local"
WEB = Identity(TD, "default", "web")


async def test_an_added_root_keeps_the_connection_a_dropped_one_retires_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects = count_controller_connects(monkeypatch)
    ca = CertificateAuthority(tmp_path / "ca", TD)
    root_file = tmp_path / "ca" / "root-cert.pem"
    root = root_file.read_text()
    CertificateAuthority(tmp_path / "other", TD)
    other_root = (tmp_path / "other" / "root-cert.pem").read_text()
    async with ca_service(ca, tmp_path) as (address, token_file):
        client = CaClient(address, token_file=token_file, root_cert_file=root_file)
        try:
            await client.create_certificate(csr_pem(), WEB, 3600)
            client.update_roots([root])  # the first bundle: only adds
            await client.create_certificate(csr_pem(), WEB, 3600)
            client.update_roots([root, other_root])  # a rotation's new root beside the old
            await client.create_certificate(csr_pem(), WEB, 3600)
            assert len(connects) == 1, f"trust only grew: one connection for every call, got {len(connects)}"
            client.update_roots([root])  # the rotation ends: other_root is no longer trusted
            await client.create_certificate(csr_pem(), WEB, 3600)
            assert len(connects) == 2, f"a dropped root retires the connection, got {len(connects)} connections"
        finally:
            await client.close()
