"""A real controller whose CA runs out: an agent's renewals, the lapse, and the recovery once the CA is replaced."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent import identity
from common.files import write_atomic
from common.pki import cert_pem, fingerprint, load_pem_certs
from common.spiffe import Identity
from controller.ca import CA_CERT, CA_KEY, ROOT_CERT, key_pem, new_root
from tests.support.identity_controller import TD, ControllerProcess, Placement
from tests.support.waiting import eventually
from tests.unit.test_identity_r1_ca_expiry import write_ca

WEB = Identity(TD, "default", "web")
CA_LIFE = 15.0


async def test_an_agent_rides_out_its_ca_expiring_and_recovers_when_a_new_ca_is_plugged_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller starts with a CA that has 15 s left and the agent asks for 24 h certificates. It gets one
    cut to the CA's expiry, renews once before it (the last chance to move to a rotated CA), then the certificate
    lapses with the CA: the controller refuses to sign (counted as ca_expired), the agent logs the lapse as an
    error and the workload is Unavailable saying why. The operator plugs in a new CA (and updates the agents'
    --root-cert): within the agent's backoff the workload has a full 24 h certificate from it."""
    monkeypatch.setattr(identity, "LAPSE_RETRY_SECONDS", (1.0, 1.5))  # the fleet's spread, for one agent
    write_ca(tmp_path / "ca", root_life=CA_LIFE)
    c = ControllerProcess(tmp_path, Placement({("node1", "default", "web")}), {"node1": "token-node1"})
    await c.start()
    m, client = c.manager("node1", ttl_seconds=24 * 3600)
    try:
        with caplog.at_level(logging.INFO, logger="ambit.identity"):
            await m.server_context(WEB)
            first = m.certificate(WEB)
            assert first is not None and first.not_after - first.not_before < CA_LIFE + 120 + 1
            await eventually(lambda: "signing CA expired" in m.snapshot()[0]["lastError"], "the lapse", within=30)
        assert m.snapshot()[0]["state"].startswith("Unavailable: INTERNAL: CA failed to sign")
        assert c.requests("granted", "ok") == 2, "the first certificate and one last-chance renewal"
        assert c.requests("error", "ca_expired") >= 1
        assert [r for r in caplog.records if r.levelno == logging.ERROR and "expired without a renewal" in r.msg]

        root, key = new_root(TD)
        pem = cert_pem(root).encode()
        write_atomic(c.ca_dir / CA_KEY, key_pem(key), 0o600)
        for name in (ROOT_CERT, CA_CERT):
            write_atomic(c.ca_dir / name, pem, 0o644)
        write_atomic(c.agent_root_cert, pem, 0o644)
        await eventually(lambda: m.snapshot()[0]["state"] == "Available", "a certificate from the new CA")
        renewed = m.certificate(WEB)
        assert renewed is not None and renewed.not_after - renewed.not_before >= 24 * 3600
        assert [fingerprint(r) for r in load_pem_certs("".join(m.roots()), "roots")] == [fingerprint(root)]
    finally:
        await m.close()
        await client.close()
        await c.stop()
