"""The CA kept in a Kubernetes Secret: created once, shared by replicas, mirrored into the CA directory."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from common.pki import fingerprint, load_pem_certs
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from controller.ca_secret import CaSecret, CaSecretError, parse_secret_ref
from tests.support.fake_kube import FakeKube, serve
from tests.support.fake_kube_identity import Objects, install_objects
from tests.support.identity_pki import csr_pem, write_plugged_ca

TD = "cluster.local"
WEB = Identity(TD, "default", "web")


@dataclass
class Api:
    fake: FakeKube
    secrets: Objects
    configmaps: Objects
    client: Any


@pytest.fixture
def api() -> Iterator[Api]:
    with serve() as fake:
        secrets = install_objects(fake, "secrets", "Secret")
        configmaps = install_objects(fake, "configmaps", "ConfigMap")
        config = k8s.Configuration()
        config.host = fake.url
        yield Api(fake, secrets, configmaps, k8s.ApiClient(config))


def _root_fps(directory: Path) -> set[str]:
    return {fingerprint(c) for c in load_pem_certs((directory / "root-cert.pem").read_text(), "roots")}


def test_first_replica_creates_secret_others_reuse_it(api: Api, tmp_path: Path) -> None:
    a = CaSecret(api.client, "istio-system", "istio-ca-secret", tmp_path / "a", TD)
    assert a.sync()
    assert api.secrets.creates == 1
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "ca-key.pem").st_mode) == 0o600
    b = CaSecret(api.client, "istio-system", "istio-ca-secret", tmp_path / "b", TD)
    assert b.sync()
    assert api.secrets.creates == 1
    assert _root_fps(tmp_path / "a") == _root_fps(tmp_path / "b")
    ca_a, ca_b = CertificateAuthority(tmp_path / "a", TD), CertificateAuthority(tmp_path / "b", TD)
    assert ca_a.sign_csr(csr_pem(), WEB, 60)[-1] == ca_b.sign_csr(csr_pem(), WEB, 60)[-1]
    assert not a.sync(), "nothing changed: nothing rewritten"


def test_losing_the_create_race_adopts_the_winner(api: Api, tmp_path: Path) -> None:
    winner = CaSecret(api.client, "istio-system", "istio-ca-secret", tmp_path / "winner", TD)

    class Late(CaSecret):
        """Saw no Secret, but the winner creates it before this replica's create."""

        def _read(self) -> dict[str, str] | None:
            if not hasattr(self, "_seen"):
                self._seen = True
                winner.sync()
                return None
            return super()._read()

    late = Late(api.client, "istio-system", "istio-ca-secret", tmp_path / "late", TD)
    late.sync()
    assert api.secrets.creates == 1
    assert _root_fps(tmp_path / "late") == _root_fps(tmp_path / "winner")


def test_plugged_in_cacerts_secret(api: Api, tmp_path: Path) -> None:
    root, inter = write_plugged_ca(tmp_path / "operator")
    data = {
        name: base64.b64encode((tmp_path / "operator" / name).read_bytes()).decode()
        for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
    }
    api.secrets.items[("istio-system", "cacerts")] = {"metadata": {"name": "cacerts"}, "data": data}
    CaSecret(api.client, "istio-system", "cacerts", tmp_path / "ca", TD).sync()
    chain = CertificateAuthority(tmp_path / "ca", TD).sign_csr(csr_pem(), WEB, 60)
    assert [fingerprint(load_pem_certs(p, "c")[0]) for p in chain[1:]] == [fingerprint(inter), fingerprint(root)]
    assert api.secrets.creates == 0


def test_secret_edit_reaches_running_ca(api: Api, tmp_path: Path) -> None:
    mirror = CaSecret(api.client, "istio-system", "istio-ca-secret", tmp_path / "ca", TD)
    mirror.sync()
    ca = CertificateAuthority(tmp_path / "ca", TD)
    other = CertificateAuthority(tmp_path / "other", TD)
    secret = api.secrets.items[("istio-system", "istio-ca-secret")]
    bundle = base64.b64decode(secret["data"]["root-cert.pem"]) + other.roots_pem()[0].encode()
    secret["data"]["root-cert.pem"] = base64.b64encode(bundle).decode()
    assert mirror.sync()
    assert ca.reload_if_changed(force=True)
    assert len(ca.roots_pem()) == 2


def test_secret_without_key_is_refused_by_name(api: Api, tmp_path: Path) -> None:
    api.secrets.items[("istio-system", "broken")] = {"metadata": {"name": "broken"}, "data": {"ca-cert.pem": "eA=="}}
    with pytest.raises(CaSecretError, match="istio-system/broken: needs data keys"):
        CaSecret(api.client, "istio-system", "broken", tmp_path / "ca", TD).sync()


def test_trust_bundle_published_and_updated_in_configmap(api: Api, tmp_path: Path) -> None:
    mirror = CaSecret(
        api.client, "ambit-system", "ambit-ca", tmp_path / "ca", TD, root_configmap=("ambit-system", "ambit-root-cert")
    )
    mirror.sync()
    published = api.configmaps.items[("ambit-system", "ambit-root-cert")]["data"]["root-cert.pem"]
    assert published == (tmp_path / "ca" / "root-cert.pem").read_text()
    mirror.sync()
    assert (api.configmaps.creates, api.configmaps.replaces) == (1, 0), "unchanged bundle is not rewritten"
    secret = api.secrets.items[("ambit-system", "ambit-ca")]
    extra = CertificateAuthority(tmp_path / "other", TD).roots_pem()[0].encode()
    secret["data"]["root-cert.pem"] = base64.b64encode(
        base64.b64decode(secret["data"]["root-cert.pem"]) + extra
    ).decode()
    mirror.sync()
    published = api.configmaps.items[("ambit-system", "ambit-root-cert")]["data"]["root-cert.pem"]
    assert published.count("BEGIN CERTIFICATE") == 2 and api.configmaps.replaces == 1


@pytest.mark.parametrize("ref", ["", "name", "/name", "ns/", "a/b/c"])
def test_secret_ref_must_be_namespace_slash_name(ref: str) -> None:
    with pytest.raises(CaSecretError, match="NAMESPACE/NAME"):
        parse_secret_ref(ref)
    assert parse_secret_ref("istio-system/cacerts") == ("istio-system", "cacerts")
