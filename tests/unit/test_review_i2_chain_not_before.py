"""A renewal is held back until its whole chain is valid by this node's clock, not just its leaf.

A plugged-in intermediate minted moments ago by a clock ahead of this node's (an operator's PKI, cert-manager) has a
notBefore in this node's future while the leaves it signs are backdated 2 minutes. Peers verify every certificate
of the chain (OpenSSL, BoringSSL) and refuse it as "not yet valid" until then.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity import CertificateManager, Priority, new_key_and_csr, parse_response
from agent.prometheus import Registry
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support.identity_pki import CaSigner, handshake, write_intermediate
from tests.support.waiting import eventually

TD = "cluster.local"
WEB = Identity(TD, "default", "web")
DB = Identity(TD, "default", "db")


def operator_root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An operator's root that may sign intermediates (the CA's own roots have pathlen 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    now = datetime.datetime.now(datetime.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return root, key


def _pem_serials(chain_pem: str) -> list[int]:
    return [c.serial_number for c in x509.load_pem_x509_certificates(chain_pem.encode())]


async def test_a_renewal_through_an_intermediate_not_valid_yet_waits_while_the_current_one_serves(
    tmp_path: Path,
) -> None:
    """The CA is rotated to an intermediate valid only 3 s from now; its leaves are backdated as usual, so the
    leaf alone looks valid. Put in service at once, the renewal was refused by every peer ("certificate is not
    yet valid") until then. The agent keeps presenting the current chain, swaps when the intermediate is valid by
    its clock, and asks the CA nothing more meanwhile."""
    root, root_key = operator_root()
    ca_dir = tmp_path / "ca"
    write_intermediate(ca_dir, root, root_key, -60, "intermediate -60")
    ca = CertificateAuthority(ca_dir, TD)
    signer = CaSigner(ca)
    registry = Registry()
    web = CertificateManager(signer, TD, ttl_seconds=3600, registry=registry)
    peer = CertificateManager(CaSigner(ca), TD, ttl_seconds=3600, registry=Registry())
    try:
        await web.server_context(WEB)
        first = web.certificate(WEB)
        assert first is not None
        peer_client = await peer.client_context(DB)
        assert handshake(await web.server_context(WEB), peer_client)[0] == DB

        inter = write_intermediate(ca_dir, root, root_key, 3, "intermediate 3")
        assert ca.reload_if_changed(force=True)
        web._request(WEB, Priority.REALTIME)  # a renewal now, as at half-life
        await eventually(lambda: signer.calls == 2, "the renewal")
        await eventually(lambda: web._entries[WEB].staged is not None or web.certificate(WEB) is not first, "answer")
        staged = web._entries[WEB].staged
        assert staged is not None, "the renewal waits for its intermediate"
        leaf = x509.load_pem_x509_certificate(staged.chain_pem.encode())
        assert leaf.not_valid_before_utc < datetime.datetime.now(datetime.UTC), "the leaf alone is valid already"
        assert staged.valid_from == inter.not_valid_before_utc.timestamp()
        assert web.certificate(WEB) is first
        assert handshake(await web.server_context(WEB), peer_client)[0] == DB
        with pytest.raises(ssl.SSLError, match="not yet valid"):
            handshake(web._server_context(staged, web.roots()), peer_client)
        ahead = registry.get_sample_value("ambit_cert_not_before_ahead_seconds")
        assert ahead is not None and 0 < ahead <= 3

        await eventually(lambda: web.certificate(WEB) is staged, "the swap at the intermediate's notBefore")
        assert _pem_serials(staged.chain_pem)[1] == inter.serial_number
        assert handshake(await web.server_context(WEB), peer_client)[0] == DB
        assert signer.calls == 2, "no request while the renewal waited"
    finally:
        await web.close()
        await peer.close()


def test_valid_from_is_the_latest_not_before_of_the_chain_and_refresh_counts_from_it(tmp_path: Path) -> None:
    """parse_response: half-life measured from when the chain becomes usable, not from the leaf's notBefore."""
    root, root_key = operator_root()
    inter = write_intermediate(tmp_path, root, root_key, 600, "intermediate 600")
    ca = CertificateAuthority(tmp_path, TD)
    key, csr = new_key_and_csr(WEB)
    received = datetime.datetime.now(datetime.UTC).timestamp()
    issued = parse_response(ca.sign_csr(csr, WEB, 3600), WEB, key, received)
    start = inter.not_valid_before_utc.timestamp()
    assert issued.not_before < received < start
    assert issued.valid_from == start
    assert issued.refresh_at == start + (issued.expires - start) / 2
