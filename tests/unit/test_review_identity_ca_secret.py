"""A CA Secret edited into something that is no CA: the mirror and the published trust bundle keep the last good
state, as the running CA does, so agents started from the ConfigMap still verify the controller."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from common.pki import fingerprint, load_pem_certs
from controller.ca import CertificateAuthority
from controller.ca_secret import CaSecret, CaSecretError
from tests.support.fake_kube import serve
from tests.support.fake_kube_identity import Objects, install_objects
from tests.support.identity_pki import write_plugged_ca

TD = "cluster.local"
SECRET = ("istio-system", "istio-ca-secret")
CONFIGMAP = ("istio-system", "istio-ca-root-cert")


@pytest.fixture
def api() -> Iterator[tuple[Objects, Objects, Any]]:
    with serve() as fake:
        secrets = install_objects(fake, "secrets", "Secret")
        configmaps = install_objects(fake, "configmaps", "ConfigMap")
        config = k8s.Configuration()
        config.host = fake.url
        yield secrets, configmaps, k8s.ApiClient(config)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "edit",
    [
        "garbage_root",  # not PEM certificates
        "foreign_key",  # a key that does not match ca-cert.pem
        "plugged_in_without_its_root",  # an intermediate whose chain reaches no root in the bundle
    ],
)
def test_a_secret_that_is_no_ca_is_neither_mirrored_nor_published(
    api: tuple[Objects, Objects, Any], tmp_path: Path, edit: str
) -> None:
    secrets, configmaps, client = api
    mirror = CaSecret(client, *SECRET, tmp_path / "ca", TD, root_configmap=CONFIGMAP)
    mirror.sync()
    ca = CertificateAuthority(tmp_path / "ca", TD)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    published = configmaps.items[CONFIGMAP]["data"]["root-cert.pem"]
    assert published.strip() == ca.roots_pem()[0].strip()

    other = tmp_path / "other"
    CertificateAuthority(other, TD)
    data = secrets.items[SECRET]["data"]
    if edit == "plugged_in_without_its_root":
        write_plugged_ca(other / "plugged")
        for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem"):
            data[name] = _b64((other / "plugged" / name).read_bytes())
        data["root-cert.pem"] = _b64((other / "root-cert.pem").read_bytes())
    elif edit == "garbage_root":
        data["root-cert.pem"] = _b64(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    else:
        data["ca-key.pem"] = _b64((other / "ca-key.pem").read_bytes())

    with pytest.raises(
        CaSecretError, match=r"secret istio-system/istio-ca-secret: data\[(root-cert|ca-key|cert-chain)\.pem\]"
    ):
        mirror.sync()

    assert configmaps.items[CONFIGMAP]["data"]["root-cert.pem"] == published, "the bad bundle reached the agents"
    assert {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()} == before
    CertificateAuthority(tmp_path / "ca", TD)  # a restart still finds a consistent CA


def test_the_published_bundle_is_the_one_the_ca_trusts(api: tuple[Objects, Objects, Any], tmp_path: Path) -> None:
    """root-cert.pem edited to another root while ca-cert.pem stays a self-signed root: the CA still trusts (and
    signs with) its own root, so the ConfigMap must carry it too; it used to get the raw text, the other root
    alone, and agents started from it could not verify the controller."""
    secrets, configmaps, client = api
    mirror = CaSecret(client, *SECRET, tmp_path / "ca", TD, root_configmap=CONFIGMAP)
    mirror.sync()
    other = CertificateAuthority(tmp_path / "other", TD)
    secrets.items[SECRET]["data"]["root-cert.pem"] = _b64(other.roots_pem()[0].encode())
    assert mirror.sync()
    ca = CertificateAuthority(tmp_path / "ca", TD)
    published = configmaps.items[CONFIGMAP]["data"]["root-cert.pem"]
    assert {fingerprint(c) for c in load_pem_certs(published, "configmap")} == {
        fingerprint(c) for pem in ca.roots_pem() for c in load_pem_certs(pem, "ca")
    }
    assert fingerprint(load_pem_certs(ca.chain_tail()[-1], "anchor")[0]) in {
        fingerprint(c) for c in load_pem_certs(published, "configmap")
    }


@pytest.mark.parametrize("damage", ["deleted", "overwritten_by_a_stale_replica"])
def test_the_published_bundle_is_restored_when_it_changes_under_the_controller(
    api: tuple[Objects, Objects, Any], tmp_path: Path, damage: str
) -> None:
    """The ConfigMap was written only when this replica's own bundle changed. Deleted (by hand, by a cleanup job),
    it stayed deleted, and agent pods mounting it could not start; overwritten by a replica that had not yet
    synced a rotation step and then went away (a rolling update), it stayed stale, and fresh agents could not
    verify the controller after `activate`. Istio re-creates istio-ca-root-cert the same way. Re-asserted every
    `republish_every` syncs, so the churn stays one idempotent write per replica per few minutes."""
    _, configmaps, client = api
    mirror = CaSecret(client, *SECRET, tmp_path / "ca", TD, root_configmap=CONFIGMAP)
    mirror.sync()
    good = configmaps.items[CONFIGMAP]["data"]["root-cert.pem"]
    if damage == "deleted":
        del configmaps.items[CONFIGMAP]
    else:
        configmaps.items[CONFIGMAP]["data"]["root-cert.pem"] = CertificateAuthority(tmp_path / "x", TD).roots_pem()[0]
    for _ in range(mirror.republish_every):
        mirror.sync()
    assert configmaps.items[CONFIGMAP]["data"]["root-cert.pem"] == good
