"""The kube source with in-cluster config, as the controller runs in a pod: HTTPS to the API server verified with
the service account's ca.crt, and the projected token re-read as the kubelet rotates it (client-go re-reads the
file every minute: transport/token_source.go NewCachedFileTokenSource; the Python client's in-cluster loader keeps
its token a minute, then reads the file again). A token read once stops working when it expires (an hour, or
the bound pod's deletion): every request after that would be 401 until a restart."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes.config import incluster_config

from controller.monitoring import ControllerMetrics
from controller.sources.kube import KubeSource, api_client
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.fake_kube import FakeKube, namespace, pod, serve
from tests.support.xds_controller import wait_for


def self_signed(directory: Path) -> tuple[Path, Path]:
    """An API server certificate for 127.0.0.1, its own CA (the cluster CA's place in ca.crt)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    crt, pem = directory / "ca.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return crt, pem


@pytest.fixture
def https_fake(tmp_path: Path) -> Iterator[tuple[FakeKube, Path]]:
    crt, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    with serve(tls=context) as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(pod("web-0", "10.1.0.1"))
        yield fake, crt


def workloads(store: ConfigStore) -> set[str]:
    return {a.workload.name for a in store.translator.addresses().values() if a.HasField("workload")}


async def test_in_cluster_config_verifies_the_ca_and_rereads_a_rotated_token(
    https_fake: tuple[FakeKube, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, ca = https_fake
    token = tmp_path / "token"
    token.write_text("token-a")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", fake.url.rsplit(":", 1)[1])
    # The loader's clock, to get past its one-minute token cache without waiting for it.
    ahead = [datetime.timedelta(0)]

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return datetime.datetime.now(tz) + ahead[0]

    monkeypatch.setattr(
        incluster_config, "datetime", types.SimpleNamespace(datetime=Clock, timedelta=datetime.timedelta)
    )
    fake.accepted_tokens = {"token-a"}
    src = KubeSource(ConfigStore(Translator(), ControllerMetrics()), api_client(), backoff_initial=0.05)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert workloads(src.store) == {"web-0"}
        # The kubelet rotates the token; the API server stops accepting the old one.
        token.write_text("token-b")
        fake.accepted_tokens = {"token-b"}
        ahead[0] = datetime.timedelta(minutes=2)
        fake.drop_watches()
        fake.upsert(pod("web-1", "10.1.0.2"))
        await wait_for(lambda: "web-1" in workloads(src.store), what="changes read with the rotated token")
    finally:
        src.stop()
    assert set(fake.tokens_seen) <= {"token-a", "token-b"} and "token-b" in fake.tokens_seen
