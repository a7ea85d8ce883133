"""Bad input at the agent's inbound HBONE port: each case is refused with a counted reason while a good
connection through the same agent keeps working."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import AsyncIterator

import pytest
from hpack import Decoder, Encoder

from agent.metrics import sample_value
from agent.state import ADDRESS_TYPE
from common import tls
from common.spiffe import Identity
from tests.integration.proxy_mesh import ECHO_PORT, Mesh
from tests.support.pki import TestCA
from tests.support.proxy_echo import connect_from, exchange_socket
from tests.support.waiting import drain_until_closed
from tests.support.workloads import pod_workload

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, GOAWAY = 1, 3, 4, 7


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


async def tls_to(mesh: Mesh, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(mesh.ip["echo-1"], 15008, ssl=ctx, server_hostname="")


async def request(mesh: Mesh, headers: list[tuple[str, str]], ident: Identity | None = None) -> str:
    """Send one HTTP/2 request as the client workload; the response status, or what ended the connection.
    Header text goes out as latin-1 bytes (hpack would send UTF-8), so any byte value can be sent."""
    ctx = await mesh.certs.client_context(ident or mesh.identity("client"))
    reader, writer = await tls_to(mesh, ctx)
    writer.write(
        PREFACE
        + frame(SETTINGS, 0, 0, b"")
        + frame(HEADERS, 0x4, 1, Encoder().encode([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]))
    )
    decoder = Decoder()
    try:
        async with asyncio.timeout(10):
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                ftype, sid = head[3], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if ftype == HEADERS and sid == 1:
                    return dict(decoder.decode(payload, raw=True))[b":status"].decode()
                if ftype == RST_STREAM and sid == 1:
                    return "reset"
                if ftype == GOAWAY:
                    return "goaway"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    finally:
        writer.close()


async def still_serves(mesh: Mesh) -> bool:
    captured = mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT))
    return (await exchange_socket(await connect_from(mesh.ip["client"], captured), 200_000)).intact


def rejects(mesh: Mesh) -> int:
    return sum(mesh.n2.stats.rejects.values())


async def assert_handshake_refused(mesh: Mesh, ctx: ssl.SSLContext) -> None:
    """The agent ends the connection during or right after the TLS handshake, counts it, and keeps serving."""
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        reader, writer = await tls_to(mesh, ctx)
        # TLS 1.3: the server's verdict on the client's certificate arrives after the client's handshake ends
        writer.write(PREFACE + frame(SETTINGS, 0, 0, b""))
        async with asyncio.timeout(10):
            if not await reader.read(100):
                raise ConnectionError("closed")
    assert rejects(mesh) >= 1
    assert await still_serves(mesh)


async def test_non_connect_is_400(mesh: Mesh) -> None:
    status = await request(
        mesh, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", f"{mesh.ip['echo-1']}:8080")]
    )
    assert status in ("400", "reset")
    assert rejects(mesh) >= 1
    assert await still_serves(mesh)


async def test_authority_mismatch_is_400(mesh: Mesh) -> None:
    # a valid CONNECT to a pod that is not the one this connection was made to (echo-2 lives elsewhere)
    status = await request(mesh, [(":method", "CONNECT"), (":authority", f"{mesh.ip['echo-2']}:8080")])
    assert status == "400"
    status = await request(mesh, [(":method", "CONNECT"), (":authority", "echo.server.svc:8080")])
    assert status == "400"
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": "bad_authority"}) == 2
    assert await still_serves(mesh)


def refusals(caplog: pytest.LogCaptureFixture, agent: str = "n2") -> list[str]:
    """The `error` of each "connection failed" line the agent's access log wrote."""
    return [
        r.fields["error"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == f"access.{agent}" and r.getMessage() == "connection failed"
    ]


async def test_connect_to_agent_port_is_503_and_logged(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    # ztunnel: an illegal (own) port found while picking the upstream is SelfCall, answered 503
    with caplog.at_level(logging.INFO):
        status = await request(mesh, [(":method", "CONNECT"), (":authority", f"{mesh.ip['echo-1']}:15008")])
    assert status == "503"
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": "self_call"}) == 1
    assert refusals(caplog) == ["self_call"]
    line = next(r for r in caplog.records if r.name == "access.n2" and r.getMessage() == "connection failed")
    assert line.fields["identity"] == str(mesh.identity("client"))  # type: ignore[attr-defined]


async def test_every_stream_refusal_is_counted_and_logged(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    pod = mesh.ip["echo-1"]
    with caplog.at_level(logging.INFO):
        assert await request(mesh, [(":method", "CONNECT"), (":authority", f"{mesh.ip['echo-2']}:8080")]) == "400"
        # the pod leaves the store while its pooled connection stays up: later CONNECTs on it find no destination
        ctx = await mesh.certs.client_context(mesh.identity("client"))
        reader, writer = await tls_to(mesh, ctx)
        enc = Encoder()
        writer.write(PREFACE + frame(SETTINGS, 0, 0, b""))
        await writer.drain()
        mesh.store.apply(ADDRESS_TYPE, {}, removed=[mesh.workloads["echo-1"].uid])
        writer.write(frame(HEADERS, 0x4, 1, enc.encode([(":method", "CONNECT"), (":authority", f"{pod}:8080")])))
        status = None
        decoder = Decoder()
        async with asyncio.timeout(10):
            while status is None:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == HEADERS:
                    status = dict(decoder.decode(payload, raw=True))[b":status"].decode()
        writer.close()
    assert status == "503"
    assert refusals(caplog) == ["bad_authority", "unknown_destination"]
    for reason in ("bad_authority", "unknown_destination"):
        assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": reason}) == 1


async def test_garbage_after_tls(mesh: Mesh) -> None:
    reader, writer = await tls_to(mesh, await mesh.certs.client_context(mesh.identity("client")))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
    await drain_until_closed(reader)
    writer.close()
    assert rejects(mesh) >= 1
    assert await still_serves(mesh)


async def test_client_without_certificate(mesh: Mesh) -> None:
    await assert_handshake_refused(mesh, tls.client_context(mesh.certs.roots(), alpn=[tls.ALPN_H2]))


async def test_client_from_another_mesh(mesh: Mesh) -> None:
    foreign = TestCA("other.domain")
    leaf = foreign.issue(Identity("other.domain", "client", "sleep"))
    # trusts our roots (so the client side completes) but presents a certificate from a foreign CA
    await assert_handshake_refused(mesh, foreign.client_context(leaf, roots=mesh.certs.roots()))


async def test_unknown_destination_address_refused(mesh: Mesh) -> None:
    # an HBONE listener reached at an address that is no local workload's: refused before TLS, and counted
    mesh.n2.serve_hbone(mesh.ip["stranger"])
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.open_connection(
            mesh.ip["stranger"], 15008, ssl=await mesh.certs.client_context(mesh.identity("client")), server_hostname=""
        )
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": "unknown_destination"}) == 1
    assert await still_serves(mesh)


async def test_client_from_another_trust_domain_of_our_ca(mesh: Mesh) -> None:
    # chains to our root, but names a workload of another trust domain: refused after the handshake
    leaf = mesh.certs.ca.issue(Identity("other.domain", "client", "sleep"))
    status = "closed"
    try:
        reader, writer = await tls_to(mesh, mesh.certs.ca.client_context(leaf))
        writer.write(PREFACE + frame(SETTINGS, 0, 0, b""))
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
        writer.close()
    except (ssl.SSLError, ConnectionError):
        status = "refused"
    assert status in ("closed", "refused")
    assert mesh.n2.stats.rejects["trust_domain"] == 1
    assert await still_serves(mesh)


async def test_huge_header_block_is_refused(mesh: Mesh) -> None:
    huge = [(":method", "CONNECT"), (":authority", f"{mesh.ip['echo-1']}:8080"), ("x-big", "a" * 200_000)]
    assert await request(mesh, huge) in ("431", "400", "reset", "goaway", "closed")
    assert rejects(mesh) >= 1
    assert await still_serves(mesh)


async def test_non_ascii_digits_are_a_bad_request(mesh: Mesh) -> None:
    """Header bytes decode as latin-1, where "¹" and "²" are str.isdigit() but not int(): a port made of them is
    a 400 (counted), and a `forwarded` client address made of them is ignored, not a 503 with a traceback."""
    pod = mesh.ip["echo-1"]
    assert await request(mesh, [(":method", "CONNECT"), (":authority", f"{pod}:\u00b9")]) == "400"
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": "bad_authority"}) == 1
    headers = [(":method", "CONNECT"), (":authority", f"{pod}:{ECHO_PORT}"), ("forwarded", 'for="1.2.3.4:\u00b2"')]
    assert await request(mesh, headers) == "200"
    assert await still_serves(mesh)


async def test_pod_ip_taken_by_another_identity_is_not_served_on_an_old_connection(mesh: Mesh) -> None:
    """An HBONE connection's TLS asserted the identity of the pod that had the address at the handshake; once the
    address belongs to a workload of another identity (pod deleted, IP reused), CONNECTs on that pooled
    connection are refused (503), never relayed to the new pod under the old pod's name."""
    pod = mesh.ip["echo-1"]
    ctx = await mesh.certs.client_context(mesh.identity("client"))
    reader, writer = await tls_to(mesh, ctx)
    enc, dec = Encoder(), Decoder()

    async def connect(sid: int) -> str:
        writer.write(frame(HEADERS, 0x4, sid, enc.encode([(":method", "CONNECT"), (":authority", f"{pod}:8080")])))
        async with asyncio.timeout(10):
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                if head[3] == HEADERS and int.from_bytes(head[5:9], "big") == sid:
                    return str(dict(dec.decode(payload, raw=True))[b":status"].decode())

    try:
        writer.write(PREFACE + frame(SETTINGS, 0, 0, b""))
        assert await connect(1) == "200"
        successor = pod_workload("db-0", "data", pod, sa="db", node="n2")
        mesh.store.apply(ADDRESS_TYPE, {}, removed=[mesh.workloads["echo-1"].uid])
        mesh.store.put([successor])
        assert await connect(3) == "503"
    finally:
        writer.close()
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": "identity_changed"}) == 1
