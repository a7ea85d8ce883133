"""Root rotation steps on the CA directory, and the running CA picking them up (or refusing broken ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from common.pki import fingerprint, is_self_signed, issued_by
from common.spiffe import Identity
from controller import ca as ca_module
from controller import ca_rotation
from controller.ca import CertificateAuthority
from tests.support.identity_pki import csr_pem

WEB = Identity("cluster.local", "default", "web")


def _certs(chain: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in chain]


def test_three_step_rotation(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ca = CertificateAuthority(d, "cluster.local")
    old = _certs(ca.roots_pem())[0]

    new_fp = ca_rotation.add_root(d, "cluster.local")
    assert ca.reload_if_changed(force=True)
    chain = _certs(ca.sign_csr(csr_pem(), WEB, 60))
    roots = [c for c in chain if is_self_signed(c)]
    assert {fingerprint(r) for r in roots} == {fingerprint(old), new_fp}
    assert fingerprint(chain[-1]) == fingerprint(old), "signing root must stay last while the new one is staged"
    assert issued_by(chain[0], old)

    assert ca_rotation.activate(d) == new_fp
    assert ca.reload_if_changed(force=True)
    chain = _certs(ca.sign_csr(csr_pem(), WEB, 60))
    assert fingerprint(chain[-1]) == new_fp
    assert issued_by(chain[0], chain[-1])
    assert fingerprint(old) in {fingerprint(c) for c in chain[1:]}, "old root still trusted during the overlap"

    assert ca_rotation.retire(d) == [fingerprint(old)]
    assert ca.reload_if_changed(force=True)
    chain = _certs(ca.sign_csr(csr_pem(), WEB, 60))
    assert [fingerprint(c) for c in chain[1:]] == [new_fp]
    assert [row["role"] for row in ca_rotation.status(d)] == ["signing"]


def test_steps_out_of_order_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    CertificateAuthority(d, "cluster.local")
    with pytest.raises(ca_rotation.RotationError, match="no staged root"):
        ca_rotation.activate(d)
    ca_rotation.add_root(d, "cluster.local")
    with pytest.raises(ca_rotation.RotationError, match="staged root exists"):
        ca_rotation.add_root(d, "cluster.local")
    with pytest.raises(ca_rotation.RotationError, match="activate"):
        ca_rotation.retire(d)


def test_inconsistent_change_keeps_last_good_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ca = CertificateAuthority(d, "cluster.local")
    roots = ca.roots_pem()
    # Half-finished rotation: new key, old certificate.
    ca_rotation.add_root(d, "cluster.local")
    (d / "ca-key.pem").write_bytes((d / "next-ca-key.pem").read_bytes())
    assert not ca.reload_if_changed(force=True)
    chain = _certs(ca.sign_csr(csr_pem(), WEB, 60))
    assert fingerprint(chain[-1]) == fingerprint(_certs(roots)[0])
    # Completing it is picked up on the next reload.
    (d / "ca-cert.pem").write_bytes((d / "next-ca-cert.pem").read_bytes())
    assert ca.reload_if_changed(force=True)
    chain = _certs(ca.sign_csr(csr_pem(), WEB, 60))
    assert fingerprint(chain[-1]) != fingerprint(_certs(roots)[0])


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    CertificateAuthority(d, "cluster.local")
    assert ca_rotation.main(["--ca-dir", str(d), "activate"]) == 1
    assert "no staged root" in capsys.readouterr().err
    assert ca_rotation.main(["--ca-dir", str(d), "add-root"]) == 0
    out = capsys.readouterr().out
    assert "staged" in out and "signing" in out


def test_the_expiry_gauges_pick_up_a_rotation_step_themselves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The citadel_server_* expiry gauges read these at every scrape: with no certificate request or handshake in
    between, they showed the CA as it was before the step (istiod watches its cacerts directory)."""
    monkeypatch.setattr(ca_module, "RELOAD_INTERVAL_SECONDS", 0.0)
    d = tmp_path / "ca"
    ca = CertificateAuthority(d, "cluster.local")
    before = ca.generation
    ca_rotation.add_root(d, "cluster.local")
    ca.chain_expiry()
    assert ca.generation != before
    staged = ca.generation
    ca_rotation.activate(d)
    ca.earliest_expiry()
    assert ca.generation != staged
