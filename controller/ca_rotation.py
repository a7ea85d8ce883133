"""Root rotation for the self-signed CA, in three steps that keep every peer verifying (docs/ca-rotation.md).

1. ``add-root``: a new root is generated and appended to the bundle (``root-cert.pem``); signing stays on the old
   root. Agents learn the two-root bundle with their next certificate.
2. ``activate``: the new root becomes the signing CA. Certificates issued from now on chain to it; peers still
   holding old-root certificates verify because everybody trusts both roots.
3. ``retire``: roots other than the one the signing chain ends in leave the bundle, once every old-root
   certificate has been replaced (for a plugged-in intermediate this is phase 3 of a rotation in your own PKI).

Each step only rewrites files (atomically); a running controller picks them up on its next reload.
Usage: ``python -m controller.ca_rotation --ca-dir DIR {status,add-root,activate,retire}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from common.files import write_atomic
from common.pki import PemError, cert_pem, fingerprint, is_self_signed, load_pem_certs, path_to_root
from controller.ca import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    NEXT_CA_CERT,
    NEXT_CA_KEY,
    ROOT_CERT,
    CaError,
    key_pem,
    new_root,
)


class RotationError(CaError):
    """A rotation step that does not apply to the directory's current state."""


def _bundle(directory: Path) -> list[x509.Certificate]:
    path = directory / ROOT_CERT
    return load_pem_certs(path.read_bytes(), str(path)) if path.exists() else []


def _signing_cert(directory: Path) -> x509.Certificate:
    path = directory / CA_CERT
    certs = load_pem_certs(path.read_bytes(), str(path))
    if not certs:
        raise RotationError(f"{path}: no certificate")
    return certs[0]


def add_root(directory: Path, trust_domain: str) -> str:
    """Step 1: stage a new root and publish it in the bundle. Returns the new root's SHA-256 fingerprint."""
    if (directory / NEXT_CA_CERT).exists() or (directory / NEXT_CA_KEY).exists():
        raise RotationError(f"{directory / NEXT_CA_CERT}: a staged root exists already; run `activate` first")
    current = _signing_cert(directory)
    if not is_self_signed(current):
        raise RotationError(f"{directory / CA_CERT}: plugged-in CA; rotate it in your own PKI")
    cert, key = new_root(trust_domain)
    write_atomic(directory / NEXT_CA_KEY, key_pem(key), 0o600)
    write_atomic(directory / NEXT_CA_CERT, cert_pem(cert).encode(), 0o644)
    bundle = _bundle(directory) or [current]
    write_atomic(directory / ROOT_CERT, "".join(cert_pem(c) for c in [*bundle, cert]).encode(), 0o644)
    return fingerprint(cert)


def activate(directory: Path) -> str:
    """Step 2: the staged root starts signing. Returns its fingerprint."""
    next_cert, next_key = directory / NEXT_CA_CERT, directory / NEXT_CA_KEY
    if not (next_cert.exists() and next_key.exists()):
        raise RotationError(f"{next_cert}: no staged root; run `add-root` first")
    staged = load_pem_certs(next_cert.read_bytes(), str(next_cert))[0]
    if all(fingerprint(r) != fingerprint(staged) for r in _bundle(directory)):
        raise RotationError(f"{directory / ROOT_CERT}: the staged root is not in the bundle; run `add-root` again")
    # The controller refuses the directory while key and certificate disagree, so it keeps signing with the old
    # pair until both files are in place.
    write_atomic(directory / CA_KEY, next_key.read_bytes(), 0o600)
    write_atomic(directory / CA_CERT, next_cert.read_bytes(), 0o644)
    (directory / CERT_CHAIN).unlink(missing_ok=True)
    next_key.unlink()
    next_cert.unlink()
    return fingerprint(staged)


def _signing_anchor(directory: Path, bundle: Sequence[x509.Certificate]) -> x509.Certificate:
    """The bundled root the signing chain ends in: ``ca-cert.pem`` itself when self-signed, else the root its
    ``cert-chain.pem`` reaches (a plugged-in intermediate)."""
    current = _signing_cert(directory)
    if is_self_signed(current):
        return current
    chain_path = directory / CERT_CHAIN
    chain = load_pem_certs(chain_path.read_bytes(), str(chain_path)) if chain_path.exists() else []
    path = path_to_root(current, [c for c in chain if fingerprint(c) != fingerprint(current)], bundle)
    if path is None:
        raise RotationError(f"{chain_path}: no chain from {directory / CA_CERT} to a root in {directory / ROOT_CERT}")
    return path[1]


def retire(directory: Path) -> list[str]:
    """Step 3: drop every root except the one the signing chain ends in. Returns the removed fingerprints."""
    if (directory / NEXT_CA_CERT).exists():
        raise RotationError(f"{directory / NEXT_CA_CERT}: a staged root exists; `activate` it before retiring")
    bundle = _bundle(directory)
    anchor = _signing_anchor(directory, bundle)
    keep = [r for r in bundle if fingerprint(r) == fingerprint(anchor)] or [anchor]
    removed = [fingerprint(r) for r in bundle if fingerprint(r) != fingerprint(anchor)]
    write_atomic(directory / ROOT_CERT, "".join(cert_pem(c) for c in keep).encode(), 0o644)
    return removed


def status(directory: Path) -> list[dict[str, str]]:
    bundle = _bundle(directory)
    current = fingerprint(_signing_anchor(directory, bundle))
    staged_path = directory / NEXT_CA_CERT
    staged = fingerprint(load_pem_certs(staged_path.read_bytes(), str(staged_path))[0]) if staged_path.exists() else ""
    rows = []
    for r in bundle:
        fp = fingerprint(r)
        role = "signing" if fp == current else "staged" if fp == staged else "trusted"
        rows.append(
            {
                "fingerprint": fp,
                "role": role,
                "subject": r.subject.rfc4514_string(),
                "not_after": r.not_valid_after_utc.isoformat(),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rotate the Ambit controller's self-signed root CA.")
    parser.add_argument("--ca-dir", required=True, type=Path)
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("step", choices=["status", "add-root", "activate", "retire"])
    args = parser.parse_args(argv)
    try:
        if args.step == "add-root":
            print(f"added root {add_root(args.ca_dir, args.trust_domain)} to the bundle (not signing yet)")
        elif args.step == "activate":
            print(f"root {activate(args.ca_dir)} now signs")
        elif args.step == "retire":
            removed = retire(args.ca_dir)
            print("removed " + (", ".join(removed) if removed else "nothing"))
        for row in status(args.ca_dir):
            print(f"{row['role']:8} {row['fingerprint'][:32]}  {row['subject']}  until {row['not_after']}")
    except (CaError, PemError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
