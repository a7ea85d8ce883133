"""The CA Secret mirrored into the CA directory: a Secret edit with one undecodable value must not leave the
directory half replaced (the next start reads it, and a new certificate beside the old key is no CA)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.ca import CertificateAuthority
from controller.ca_secret import CaSecret, CaSecretError
from tests.support.fake_kube import serve
from tests.support.fake_kube_identity import Objects, install_objects

TD = "cluster.local"


@pytest.fixture
def api() -> Iterator[tuple[Objects, Any]]:
    with serve() as fake:
        secrets = install_objects(fake, "secrets", "Secret")
        install_objects(fake, "configmaps", "ConfigMap")
        config = k8s.Configuration()
        config.host = fake.url
        yield secrets, k8s.ApiClient(config)


def test_a_bad_value_leaves_the_directory_as_the_last_good_secret(api: tuple[Objects, Any], tmp_path: Path) -> None:
    secrets, client = api
    mirror = CaSecret(client, "istio-system", "istio-ca-secret", tmp_path / "ca", TD)
    mirror.sync()
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    # A rotation written to the Secret: a new signing certificate and key, but the bundle was pasted undecoded.
    other = CertificateAuthority(tmp_path / "other", TD)
    data = secrets.items[("istio-system", "istio-ca-secret")]["data"]
    data["ca-cert.pem"] = base64.b64encode((tmp_path / "other" / "ca-cert.pem").read_bytes()).decode()
    data["ca-key.pem"] = base64.b64encode((tmp_path / "other" / "ca-key.pem").read_bytes()).decode()
    data["root-cert.pem"] = other.roots_pem()[0]  # PEM text, not base64
    with pytest.raises(CaSecretError, match=r"data\[root-cert.pem\] is not base64"):
        mirror.sync()
    # Before: ca-cert.pem and ca-key.pem were already replaced when root-cert.pem failed to decode.
    assert {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()} == before
    CertificateAuthority(tmp_path / "ca", TD)  # still a consistent CA
