"""The agent's certificates in /config_dump and /certs, in ztunnel's shape (src/admin.rs CertsDump/CertDump), read
back the way `istioctl ztunnel-config certificates` reads them: pem is base64 of the PEM text, serialNumber
decimal, validFrom/expirationTime RFC 3339 in UTC seconds; state Available, Initializing or "Unavailable: <why>"."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.admin import admin_server, config_dump
from agent.ca_client import CaRequestError
from agent.identity import Backoff, CertificateManager, CertificateUnavailable
from agent.prometheus import Registry
from agent.state import WorkloadStore
from common.pki import fingerprint, load_pem_certs
from common.spiffe import Identity
from controller import ca_rotation
from controller.ca import CertificateAuthority
from tests.support.identity_pki import write_plugged_ca
from tests.support.waiting import eventually
from tests.unit.test_identity_manager import FakeSigner

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
DB = Identity(TD, "default", "db")
FAST = Backoff(initial=0.02, maximum=0.1)
ENTRY_KEYS = {"identity", "state", "certChain", "rootCerts", "refreshAt", "lastError"}
CERT_KEYS = {"pem", "serialNumber", "validFrom", "expirationTime"}
RFC3339_UTC_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decoded(dump: dict[str, Any]) -> x509.Certificate:
    """The one certificate a CertDump holds, checked field by field against what its pem decodes to."""
    assert set(dump) == CERT_KEYS
    pem = base64.b64decode(dump["pem"], validate=True).decode()
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n"), "pem is base64 of the PEM text"
    [cert] = load_pem_certs(pem, "dumped pem")
    assert re.fullmatch(r"[1-9][0-9]*", dump["serialNumber"]) and int(dump["serialNumber"]) == cert.serial_number
    assert RFC3339_UTC_SECONDS.fullmatch(dump["validFrom"]) and RFC3339_UTC_SECONDS.fullmatch(dump["expirationTime"])
    assert dump["validFrom"] == rfc3339(cert.not_valid_before_utc)
    assert dump["expirationTime"] == rfc3339(cert.not_valid_after_utc)
    return cert


def entry(m: CertificateManager, ident: Identity) -> dict[str, Any]:
    rows = [r for r in m.snapshot() if r["identity"] == str(ident)]
    assert len(rows) == 1
    return dict(rows[0])


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca", TD)


@pytest.fixture
async def manager(ca: CertificateAuthority) -> AsyncIterator[CertificateManager]:
    m = CertificateManager(FakeSigner(ca), TD, ttl_seconds=3600, registry=Registry(), backoff=FAST)
    yield m
    await m.close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


async def test_issued_certificate_with_intermediate_over_the_admin_port(tmp_path: Path) -> None:
    root, intermediate = write_plugged_ca(tmp_path / "ca", TD)
    m = CertificateManager(FakeSigner(CertificateAuthority(tmp_path / "ca", TD)), TD, registry=Registry())
    admin = admin_server(config_dump(WorkloadStore(), m), m.snapshot, lambda: None)
    await admin.start("127.0.0.1", 0)
    try:
        await m.server_context(WEB)
        held = m.certificate(WEB)
        assert held is not None
        dump = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin.port}/config_dump")
        certs = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin.port}/certs")
    finally:
        await admin.close()
        await m.close()

    assert certs == dump["certificates"]
    [web] = certs
    assert set(web) == ENTRY_KEYS
    assert (web["identity"], web["state"], web["lastError"]) == (str(WEB), "Available", "")
    leaf, inter = (decoded(d) for d in web["certChain"])
    assert leaf.serial_number == held.serial and fingerprint(leaf) == fingerprint(load_pem_certs(held.chain_pem, "")[0])
    assert leaf.not_valid_after_utc.timestamp() == held.not_after
    assert fingerprint(inter) == fingerprint(intermediate), "certChain is the leaf, then its intermediates"
    assert [fingerprint(decoded(d)) for d in web["rootCerts"]] == [fingerprint(root)], "rootCerts: the bundle"
    assert web["certChain"][0]["validFrom"] < web["refreshAt"] < web["certChain"][0]["expirationTime"]
    assert web["refreshAt"] == rfc3339(datetime.datetime.fromtimestamp(held.refresh_at, datetime.UTC))


async def test_identity_still_being_fetched_is_initializing(ca: CertificateAuthority) -> None:
    signer = FakeSigner(ca)
    signer.gate = asyncio.Event()
    m = CertificateManager(signer, TD, registry=Registry())
    try:
        m.prefetch([WEB])
        await eventually(lambda: signer.calls == [WEB], "the fetch to start")
        assert entry(m, WEB) == {
            "identity": str(WEB),
            "state": "Initializing",
            "certChain": [],
            "rootCerts": [],
            "refreshAt": "",
            "lastError": "",
        }
        signer.gate.set()
        await eventually(lambda: entry(m, WEB)["state"] == "Available", "the certificate")
    finally:
        await m.close()


async def test_identity_whose_fetch_failed_is_unavailable_with_the_reason(manager: CertificateManager) -> None:
    signer = manager.signer
    assert isinstance(signer, FakeSigner)
    signer.fail = CaRequestError("permission_denied", "PERMISSION_DENIED: node node1 runs no pod default/db")
    with pytest.raises(CertificateUnavailable):
        await manager.client_context(DB)
    assert entry(manager, DB) == {
        "identity": str(DB),
        "state": "Unavailable: PERMISSION_DENIED: node node1 runs no pod default/db",
        "certChain": [],
        "rootCerts": [],
        "refreshAt": "",
        "lastError": "PERMISSION_DENIED: node node1 runs no pod default/db",
    }


async def test_expired_certificate_awaiting_its_renewal_is_unavailable(ca: CertificateAuthority) -> None:
    """No failure yet (the renewal hangs), but what is held expired: nothing usable, so not Available."""
    signer = FakeSigner(ca)
    m = CertificateManager(signer, TD, ttl_seconds=1, registry=Registry())
    try:
        await m.server_context(WEB)
        held = m.certificate(WEB)
        assert held is not None
        signer.gate = asyncio.Event()  # the renewal at half-life never completes
        expired_at = rfc3339(datetime.datetime.fromtimestamp(held.not_after, datetime.UTC))
        await eventually(lambda: entry(m, WEB)["state"] != "Available", "the expiry")
        assert entry(m, WEB) == {
            "identity": str(WEB),
            "state": f"Unavailable: certificate expired at {expired_at}",
            "certChain": [],
            "rootCerts": [],
            "refreshAt": "",
            "lastError": "",
        }
        signer.gate.set()
    finally:
        await m.close()


async def test_dump_follows_renewals_and_a_new_root(ca: CertificateAuthority) -> None:
    """Parsed certificates are reused between dumps; a renewal or a new bundle must still show at once."""
    m = CertificateManager(FakeSigner(ca), TD, ttl_seconds=2, registry=Registry(), backoff=FAST)
    try:
        await m.server_context(WEB)
        first = m.certificate(WEB)
        assert first is not None
        assert [decoded(d).serial_number for d in entry(m, WEB)["certChain"]] == [first.serial]
        assert len(entry(m, WEB)["rootCerts"]) == 1
        ca_rotation.add_root(ca.directory, TD)
        ca.reload_if_changed(force=True)
        await eventually(lambda: len(m.roots()) == 2, "the new bundle")
        held = m.certificate(WEB)
        assert held is not None and held.serial != first.serial
        web = entry(m, WEB)
        assert [decoded(d).serial_number for d in web["certChain"]] == [held.serial]
        bundle = {fingerprint(c) for pem in m.roots() for c in load_pem_certs(pem, "bundle")}
        assert {fingerprint(decoded(d)) for d in web["rootCerts"]} == bundle
    finally:
        await m.close()


async def test_identities_are_sorted_by_their_uri_as_ztunnel_sorts_them(ca: CertificateAuthority) -> None:
    """Identity orders by namespace first; ztunnel sorts the URIs, where "ns/a-b/" comes before "ns/a/"."""
    signer = FakeSigner(ca)
    signer.gate = asyncio.Event()
    m = CertificateManager(signer, TD, registry=Registry())
    idents = [Identity(TD, "a", "web"), Identity(TD, "a-b", "web")]
    try:
        m.prefetch(idents)
        assert [r["identity"] for r in m.snapshot()] == sorted(str(i) for i in idents)
        assert sorted(idents) != sorted(idents, key=str), "the two orders differ for these identities"
        signer.gate.set()
    finally:
        await m.close()
