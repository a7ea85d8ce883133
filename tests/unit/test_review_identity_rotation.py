"""Root rotation steps against a plugged-in CA (an operator's intermediate under their own root)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.pki import fingerprint, issued_by, load_pem_certs
from common.spiffe import Identity
from controller import ca_rotation
from controller.ca import ROOT_CERT, CaLoadError, CertificateAuthority, new_root
from tests.support.identity_pki import csr_pem, write_plugged_ca

WEB = Identity("cluster.local", "default", "web")


def test_retire_on_a_plugged_in_ca_keeps_the_root_its_chain_ends_in(tmp_path: Path) -> None:
    """Phase 3 of a plugged-in rotation (docs/ca-rotation.md): the old root leaves the bundle, the root the
    intermediate chains to stays. `retire` used to keep only the signing certificate, here the intermediate, so it
    wrote the intermediate as the whole bundle and deleted every root: the running CA refused the directory and a
    restarted controller could not start."""
    d = tmp_path / "ca"
    root, _ = write_plugged_ca(d)
    old_root, _ = new_root("cluster.local")
    pem = serialization.Encoding.PEM
    (d / ROOT_CERT).write_bytes(old_root.public_bytes(pem) + root.public_bytes(pem))
    ca = CertificateAuthority(d, "cluster.local")

    assert ca_rotation.retire(d) == [fingerprint(old_root)]

    assert ca.reload_if_changed(force=True), "the retired directory must still be a consistent CA"
    assert [fingerprint(r) for c in ca.roots_pem() for r in load_pem_certs(c, "roots")] == [fingerprint(root)]
    assert CertificateAuthority(d, "cluster.local").sign_csr(csr_pem(), WEB, 60)
    assert [(row["role"], row["fingerprint"]) for row in ca_rotation.status(d)] == [("signing", fingerprint(root))]


def test_a_reload_while_signing_does_not_mix_two_cas_in_one_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's serving-certificate callback reloads the CA directory from its own thread, so a rotation step can be
    picked up between signing a leaf and building the rest of its chain. The chain must still be the one CA's that
    signed the leaf, root last: sign_csr used to read the CA state twice and could return a leaf from the old root
    with the new root last (with a plugged-in intermediate, the wrong intermediate: a chain nobody can verify)."""
    d = tmp_path / "ca"
    ca = CertificateAuthority(d, "cluster.local")
    ca_rotation.add_root(d, "cluster.local")
    assert ca.reload_if_changed(force=True)
    ca_rotation.activate(d)  # on disk; the CA has not seen it yet
    issue = CertificateAuthority._issue

    def issue_then_reload(self: CertificateAuthority, *args: Any, **kwargs: Any) -> x509.Certificate:
        leaf = issue(self, *args, **kwargs)
        assert self.reload_if_changed(force=True)  # what the other thread does at this moment
        return leaf

    monkeypatch.setattr(CertificateAuthority, "_issue", issue_then_reload)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in ca.sign_csr(csr_pem(), WEB, 60)]
    assert issued_by(chain[0], chain[-1]), "the root last in the chain must be the one that signed the leaf"


def test_a_half_copied_plugged_in_ca_is_refused_not_overwritten(tmp_path: Path) -> None:
    """An operator plugging in their PKI copies root-cert.pem and cert-chain.pem before ca-cert.pem and ca-key.pem,
    and the controller starts in between: the directory has no signing pair, but it is not empty. It used to be
    taken for a first start: a fresh self-signed root was minted and written over the operator's root-cert.pem, and
    once the rest was copied the intermediate's chain no longer reached the bundle."""
    d = tmp_path / "ca"
    root, _ = write_plugged_ca(d)
    (d / "ca-cert.pem").unlink()
    (d / "ca-key.pem").unlink()
    with pytest.raises(CaLoadError, match=r"ca-key\.pem: missing while cert-chain\.pem, root-cert\.pem exist"):
        CertificateAuthority(d, "cluster.local")
    assert [fingerprint(c) for c in load_pem_certs((d / ROOT_CERT).read_bytes(), "roots")] == [fingerprint(root)]
    assert not (d / "ca-key.pem").exists()
