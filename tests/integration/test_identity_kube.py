"""Cluster mode: `ambit-controller --kube` authenticates agents with TokenReview against a (fake) API server and
authorizes them by where the API says pods run, live as pods come and go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.ca_client import CaRequestError
from common.spiffe import Identity
from tests.support.fake_kube import FakeKube, namespace, serve
from tests.support.fake_kube_identity import Objects, TokenIdentity, TokenReviews, install, install_objects, pod
from tests.support.identity_controller import TD, ControllerProcess, Placement
from tests.support.identity_pki import csr_pem

WEB = Identity(TD, "default", "web")
DB = Identity(TD, "data", "db")


@dataclass
class Kube:
    fake: FakeKube
    table: TokenReviews
    configmaps: Objects


@pytest.fixture
def kube() -> Iterator[Kube]:
    with serve() as fake:
        table = install(fake)
        install_objects(fake, "secrets", "Secret")
        configmaps = install_objects(fake, "configmaps", "ConfigMap")
        for ns in ("default", "data", "ambit-system"):
            fake.upsert(namespace(ns))
        fake.upsert(pod("ambit-system", "agent-n1", "uid-a1", "ambit-agent", "node1", "10.10.0.11"))
        fake.upsert(pod("ambit-system", "agent-n2", "uid-a2", "ambit-agent", "node2", "10.10.0.12"))
        fake.upsert(pod("default", "web-1", "uid-w1", "web", "node1", "10.244.1.10"))
        fake.upsert(pod("data", "db-1", "uid-d1", "db", "node2", "10.244.2.10"))
        table.tokens["tok-n1"] = TokenIdentity("ambit-system", "ambit-agent", "agent-n1", "uid-a1")
        table.tokens["tok-n2"] = TokenIdentity("ambit-system", "ambit-agent", "agent-n2", "uid-a2")
        table.tokens["tok-web"] = TokenIdentity("default", "web", "web-1", "uid-w1")
        yield Kube(fake, table, configmaps)


async def test_token_review_and_live_pod_placement(kube: Kube, tmp_path: Path) -> None:
    fake, table = kube.fake, kube.table
    controller = ControllerProcess(tmp_path, Placement(), {}, kubeconfig=fake.write_kubeconfig(tmp_path / "kubeconfig"))
    for name, token in (("node1", "tok-n1"), ("node2", "tok-n2"), ("web", "tok-web"), ("forged", "nope")):
        (tmp_path / f"{name}.token").write_text(token)
    await controller.start()
    clients = {n: controller.client(n) for n in ("node1", "node2", "web", "forged")}

    async def outcome(caller: str, ident: Identity) -> str:
        try:
            chain = await clients[caller].create_certificate(csr_pem(), ident, 600)
        except CaRequestError as e:
            return e.reason
        return "granted" if len(chain) == 2 else f"odd chain of {len(chain)}"

    try:
        assert await outcome("node1", WEB) == "granted"
        assert await outcome("node2", DB) == "granted"
        assert await outcome("node1", DB) == "permission_denied"
        assert await outcome("web", WEB) == "permission_denied"  # a workload token is not a node agent's
        assert await outcome("forged", WEB) == "unauthenticated"
        assert any(r["spec"].get("audiences") == ["istio-ca"] for r in table.reviews)

        # db gets scheduled on node1 too: node1's agent may now ask for it, as soon as the watch delivers.
        fake.upsert(pod("data", "db-2", "uid-d2", "db", "node1", "10.244.1.20"))
        deadline = time.monotonic() + 20
        while await outcome("node1", DB) != "granted":
            assert time.monotonic() < deadline, "node1 never got data/db after the pod was scheduled there"
            await asyncio.sleep(0.2)
        assert controller.requests("refused", "untrusted_account") == 1
        assert controller.requests("refused", "bad_token") == 1
    finally:
        for c in clients.values():
            await c.close()
        await controller.stop()


async def test_replicas_share_the_ca_secret(kube: Kube, tmp_path: Path) -> None:
    fake = kube.fake
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(
            ControllerProcess(
                tmp_path / name,
                Placement(),
                {"node1": "tok-n1"},
                kubeconfig=kubeconfig,
                extra_args=("--ca-secret", "istio-system/istio-ca-secret", "--root-configmap", "istio-system/root"),
            )
        )
    try:
        await asyncio.gather(*(r.start() for r in replicas))  # concurrently: both may race to create the Secret
        assert replicas[0].root_cert.read_text() == replicas[1].root_cert.read_text()
        published = kube.configmaps.items[("istio-system", "root")]["data"]["root-cert.pem"]
        assert published == replicas[0].root_cert.read_text(), "trust bundle published for agents' --root-cert"
        # An agent that was given replica a's root gets verified certificates from replica b.
        client = replicas[1].client("node1")
        client.root_cert_file = replicas[0].agent_root_cert
        try:
            chain = await client.create_certificate(csr_pem(), WEB, 600)
        finally:
            await client.close()
        assert chain[-1] == replicas[0].root_cert.read_text()
    finally:
        for r in replicas:
            await r.stop()
