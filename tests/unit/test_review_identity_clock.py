"""Clock skew between the CA and the peers that verify what it issues."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support.identity_pki import csr_pem

WEB = Identity("cluster.local", "default", "web")


def test_a_peer_whose_clock_is_behind_the_ca_accepts_a_fresh_certificate(tmp_path: Path) -> None:
    """Every refresh hands peers a certificate minted a moment ago by the CA's clock. A peer (another node) whose
    clock runs behind by more than the backdating refuses it as not yet valid until its clock catches up: with 60 s
    of backdating, a node 90 s behind the controller failed every refreshed workload's handshakes for 30 s after
    each refresh. Istio's CA backdates by 2 minutes (pki/util ClockSkewGracePeriod); so does this one."""
    ca = CertificateAuthority(tmp_path / "ca", "cluster.local")
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in ca.sign_csr(csr_pem(), WEB, 3600)]
    peer_clock = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=110)
    verifier = PolicyBuilder().store(Store([chain[-1]])).time(peer_clock).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:-1])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WEB))]
