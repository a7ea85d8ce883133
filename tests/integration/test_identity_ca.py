"""Agents' certificate managers against the controller's CA over real gRPC TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf import struct_pb2

from agent.identity import CertificateManager, CertificateUnavailable
from api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from common.pki import cert_pem, fingerprint, issued_by, load_pem_certs
from common.spiffe import Identity
from controller import ca_rotation
from tests.support.identity_controller import TD, ControllerProcess, Placement, tcp_handshake
from tests.support.identity_pki import csr_pem, rsa_csr_pem
from tests.support.waiting import eventually

WEB = Identity(TD, "default", "web")
API = Identity(TD, "default", "api")
DB = Identity(TD, "data", "db")


PLACEMENT = Placement({("node1", "default", "web"), ("node1", "default", "api"), ("node2", "data", "db")})
TOKENS = {"node1": "token-node1", "node2": "token-node2"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    """One controller for the tests that neither restart it nor touch its CA directory."""
    c = ControllerProcess(tmp_path_factory.mktemp("identity"), PLACEMENT, TOKENS)
    c.start_sync()
    try:
        yield c
    finally:
        c.stop_sync()


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[ControllerProcess]:
    """A controller of its own, for tests that restart it or rotate its root."""
    c = ControllerProcess(tmp_path, PLACEMENT, TOKENS)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def raw_call(
    c: ControllerProcess, *, token: str | None, identity: str | None, csr: str | None = None, ttl: int = 3600
) -> ca_pb2.IstioCertificateResponse:
    request = ca_pb2.IstioCertificateRequest(csr=csr if csr is not None else csr_pem(), validity_duration=ttl)
    if identity is not None:
        md = struct_pb2.Struct()
        md["ImpersonatedIdentity"] = identity
        request.metadata.CopyFrom(md)
    creds = grpc.ssl_channel_credentials(c.root_cert.read_bytes())
    options = [("grpc.ssl_target_name_override", "ambit-controller")]
    async with grpc.aio.secure_channel(c.address, creds, options=options) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        return await stub.CreateCertificate(request, metadata=metadata, timeout=5)


def leaf_of(m: CertificateManager, ident: Identity) -> x509.Certificate:
    cert = m.certificate(ident)
    assert cert is not None
    return load_pem_certs(cert.chain_pem, "held")[0]


async def test_agent_gets_its_own_workloads_and_they_talk_mtls(shared: ControllerProcess) -> None:
    granted = shared.requests("granted", "ok")
    node1, c1 = shared.manager("node1")
    node2, c2 = shared.manager("node2")
    try:
        node1.prefetch([WEB, API])
        await eventually(lambda: [r["state"] for r in node1.snapshot()] == ["Available", "Available"], "node1 warm-up")
        assert {r["identity"] for r in node1.snapshot()} == {str(WEB), str(API)}
        seen_by_server, seen_by_client = await tcp_handshake(
            await node1.server_context(WEB), await node2.client_context(DB)
        )
        assert (seen_by_server, seen_by_client) == (DB, WEB)
        assert shared.requests("granted", "ok") == granted + 3
    finally:
        for m, c in ((node1, c1), (node2, c2)):
            await m.close()
            await c.close()


async def test_workload_on_another_node_is_refused(shared: ControllerProcess) -> None:
    refused = shared.requests("refused", "not_on_node")
    node1, client = shared.manager("node1")
    try:
        with pytest.raises(CertificateUnavailable, match=r"PERMISSION_DENIED: node node1 runs no pod .*data/db"):
            await node1.client_context(DB)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await raw_call(shared, token="token-node2", identity=str(WEB))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert shared.requests("refused", "not_on_node") == refused + 2
    finally:
        await node1.close()
        await client.close()


async def test_unauthenticated_callers_are_refused(shared: ControllerProcess, tmp_path: Path) -> None:
    missing, bad_token = shared.requests("refused", "no_credentials"), shared.requests("refused", "bad_token")
    for token in (None, "token-node3", "token-node1x"):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await raw_call(shared, token=token, identity=str(WEB))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
    bad = tmp_path / "bad.token"
    bad.write_text("forged\n")
    client = shared.client("node1", token_file=bad)
    try:
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await client.create_certificate(csr_pem(), WEB, 60)
    finally:
        await client.close()
    assert shared.requests("refused", "no_credentials") == missing + 1
    assert shared.requests("refused", "bad_token") == bad_token + 3


@pytest.mark.parametrize(
    ("csr", "identity", "ttl", "reason", "message"),
    [
        ("garbage", str(WEB), 3600, "bad_csr", "csr: not a PEM-encoded PKCS#10"),
        ("rsa", str(WEB), 3600, "bad_key_type", "RSA-2048; only ECDSA P-256"),
        (None, "default/web", 3600, "bad_identity", "not a SPIFFE ID"),
        (None, "spiffe://evil.example/ns/default/sa/web", 3600, "foreign_trust_domain", "not in trust domain"),
        (None, str(WEB), 10**15, "ttl_too_large", "exceeds the maximum"),
    ],
)
async def test_bad_input_gets_clear_error_and_controller_keeps_serving(
    shared: ControllerProcess, csr: str | None, identity: str, ttl: int, reason: str, message: str
) -> None:
    body = rsa_csr_pem() if csr == "rsa" else csr
    refused = shared.requests("refused", reason)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await raw_call(shared, token="token-node1", identity=identity, csr=body, ttl=ttl)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (exc.value.details() or "")
    assert shared.requests("refused", reason) == refused + 1
    assert shared.alive
    ok = await raw_call(shared, token="token-node1", identity=str(WEB))
    assert len(ok.cert_chain) == 2


async def test_short_ttl_rotates_while_a_valid_certificate_is_always_held(shared: ControllerProcess) -> None:
    node1, c1 = shared.manager("node1", ttl_seconds=3)
    node2, c2 = shared.manager("node2", ttl_seconds=3)
    try:
        await node1.server_context(WEB)
        await node2.client_context(DB)
        serials: set[int] = set()
        deadline = time.monotonic() + 10
        samples = 0
        while time.monotonic() < deadline:
            for m, ident in ((node1, WEB), (node2, DB)):
                cert = m.certificate(ident)
                assert cert is not None and cert.not_after > time.time(), f"{ident} had no valid certificate"
            serials.add(node1.certificate(WEB).serial)  # type: ignore[union-attr]
            if samples % 5 == 0:  # and the contexts in hand really work
                seen = await tcp_handshake(await node1.server_context(WEB), await node2.client_context(DB))
                assert seen == (DB, WEB)
            samples += 1
            await asyncio.sleep(0.1)
        assert len(serials) >= 4, f"expected repeated rotation, saw {len(serials)} certificates"
    finally:
        for m, c in ((node1, c1), (node2, c2)):
            await m.close()
            await c.close()


async def test_restart_with_same_ca_dir_keeps_root_and_agents_continue(controller: ControllerProcess) -> None:
    node1, client = controller.manager("node1", ttl_seconds=2)
    try:
        await node1.server_context(WEB)
        roots_before = controller.root_cert.read_text()
        await controller.stop()
        await eventually(lambda: node1.snapshot()[0]["lastError"] != "", "refresh failing while the CA is down")
        await controller.start()
        assert controller.root_cert.read_text() == roots_before
        first = node1.certificate(WEB)
        await eventually(
            lambda: node1.snapshot()[0]["state"] == "Available" and node1.certificate(WEB) is not first,
            "refresh after the controller restarted",
        )
        assert node1.roots() == load_roots(roots_before)
    finally:
        await node1.close()
        await client.close()


def load_roots(pem: str) -> list[str]:
    return [cert_pem(c) for c in load_pem_certs(pem, "roots")]


async def test_root_rotation_keeps_both_sides_verifying(controller: ControllerProcess) -> None:
    node1, c1 = controller.manager("node1", ttl_seconds=3)
    node2, c2 = controller.manager("node2", ttl_seconds=3)
    failures: list[str] = []
    handshakes = 0
    stop = asyncio.Event()

    async def keep_handshaking() -> None:
        nonlocal handshakes
        while not stop.is_set():
            for server, sid, client, cid in ((node1, WEB, node2, DB), (node2, DB, node1, WEB)):
                try:
                    seen = await tcp_handshake(await server.server_context(sid), await client.client_context(cid))
                    if seen != (cid, sid):
                        failures.append(f"wrong identities {seen}")
                    handshakes += 1
                except Exception as e:
                    failures.append(f"{sid} <- {cid}: {type(e).__name__}: {e}")
            await asyncio.sleep(0.05)

    def roots_of(m: CertificateManager) -> set[str]:
        return {fingerprint(c) for r in m.roots() for c in load_pem_certs(r, "root")}

    try:
        await node1.server_context(WEB)
        await node2.server_context(DB)
        old = roots_of(node1)
        sampler = asyncio.create_task(keep_handshaking())

        new_fp = ca_rotation.add_root(controller.ca_dir, TD)
        await eventually(lambda: all(roots_of(m) == old | {new_fp} for m in (node1, node2)), "bundle with both roots")

        ca_rotation.activate(controller.ca_dir)
        new_root = next(c for c in load_pem_certs(controller.root_cert.read_text(), "b") if fingerprint(c) == new_fp)

        def on_new_root(m: CertificateManager, ident: Identity) -> bool:
            return m.certificate(ident) is not None and issued_by(leaf_of(m, ident), new_root)

        await eventually(lambda: on_new_root(node1, WEB) and on_new_root(node2, DB), "leaves from the new root")

        ca_rotation.retire(controller.ca_dir)
        await eventually(lambda: all(roots_of(m) == {new_fp} for m in (node1, node2)), "old root retired")
        stop.set()
        await sampler
        assert not failures, failures[:5]
        assert handshakes > 10

        # The agents' --root-cert still names only the old root, yet their CA channel keeps verifying the
        # controller (whose serving certificate now comes from the new root) through the learned bundle. A restart
        # forces new TLS connections to the controller, so this really is a fresh handshake.
        on_disk = {fingerprint(c) for c in load_pem_certs(controller.agent_root_cert.read_text(), "agent root")}
        assert on_disk == old, "agents were only ever given the old root"
        await controller.stop()
        await controller.start()
        # 3 s certificates may have expired during the restart; the retries (backoff capped at 1 s here) recover.
        await eventually(
            lambda: all(r["state"] == "Available" for m in (node1, node2) for r in m.snapshot()), "valid after restart"
        )
        assert await tcp_handshake(await node1.server_context(WEB), await node2.client_context(DB)) == (DB, WEB)
        assert issued_by(leaf_of(node1, WEB), new_root)
    finally:
        stop.set()
        for m, c in ((node1, c1), (node2, c2)):
            await m.close()
            await c.close()
