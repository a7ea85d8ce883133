"""Per-run certificates for the reference proxies (Envoy pair, Python TLS relay pair, bare tunnel pair).

Issued by Ambit's own CA (controller/ca.py) from agent-style CSRs (agent/identity.py), so the comparison proxies
present exactly the certificates a mesh workload gets: ECDSA P-256, one SPIFFE URI SAN, serverAuth + clientAuth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent.identity import new_key_and_csr
from common.spiffe import Identity
from controller.ca import CertificateAuthority

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = Identity(TRUST_DOMAIN, "bench", "client")
SERVER_ID = Identity(TRUST_DOMAIN, "bench", "server")
TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class CertFiles:
    root: Path
    client_cert: Path  # leaf first, then the rest of the chain
    client_key: Path
    server_cert: Path
    server_key: Path


def generate(out_dir: Path) -> CertFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(out_dir / "ca", TRUST_DOMAIN)
    files = CertFiles(
        root=out_dir / "root.crt",
        client_cert=out_dir / "client.crt",
        client_key=out_dir / "client.key",
        server_cert=out_dir / "server.crt",
        server_key=out_dir / "server.key",
    )
    files.root.write_text("".join(ca.roots_pem()))
    for ident, cert_path, key_path in (
        (CLIENT_ID, files.client_cert, files.client_key),
        (SERVER_ID, files.server_cert, files.server_key),
    ):
        key, csr = new_key_and_csr(ident)
        cert_path.write_text("".join(ca.sign_csr(csr, ident, TTL_SECONDS)))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
    return files
