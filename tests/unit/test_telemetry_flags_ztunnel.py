"""response_flags as ztunnel sets them, and what it does not count as an error.

ztunnel (istio/ztunnel 62d8265) infers the flag of a failed connection from its proxy::Error variant
(src/proxy/metrics.rs `ConnectionResult::record` -> `extract_failure_reason`): Error::Tls -> TLS_FAILURE,
Error::Http2Handshake and Error::H2 -> H2_HANDSHAKE_FAILURE, MaybeHBONENetworkPolicyError -> NETWORK_POLICY,
Error::Identity -> IDENTITY_ERROR, the policy rejections -> DENY, anything else (HttpStatus, Io, ...) -> CONNECT.
What opening a tunnel raises: src/proxy/pool.rs `new_pool_conn` (a TCP connect that timed out is
MaybeHBONENetworkPolicyError, other connect errors and the TLS connector's io::Error are Error::Io, building the
client config is Error::Tls) and src/proxy/h2/client.rs (`builder.handshake` -> Http2Handshake, a failed
request -> H2, a non-200 -> HttpStatus). Resets and broken pipes while copying are no errors at all
(src/copy.rs `ignore_io_errors`; src/proxy/h2.rs maps RST_STREAM NO_ERROR/CANCEL/STREAM_CLOSED to EOF or a
broken pipe).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent import tunnel
from agent.accesslog import AccessLog
from agent.connections import ConnectionRegistry
from agent.hbone import ErrorCode
from agent.identity import CertificateUnavailable
from agent.inbound import ABANDONED, InboundProxy
from agent.metrics import CONNECT_FAILURE_FLAGS, Metrics, sample_value
from agent.outbound import OutboundProxy, Route, RouteKind
from agent.pool import HboneConnectionPool, PoolKey
from agent.state import WorkloadStore
from agent.tunnel import ConnectRequest, ConnectStage, HboneConnectError, RelayResult, TunnelStats, relay
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity
from tests.support.hbone_testbed import HboneServer
from tests.support.loops import BOTH_LOOPS, event_loop_policy  # noqa: F401  (fixture)
from tests.support.pki import TestCA
from tests.unit.test_proxy_connections import CURL, SERVER, _Certs, _FakeRequest, fake_pod_and_relay, server_registry

pytestmark = BOTH_LOOPS

CA = TestCA()
CLIENT_ID = CA.identity("default", "client")
SERVER_ID = CA.identity("default", "server")
CLIENT_CTX = CA.client_context(CA.issue(CLIENT_ID))
SERVER_CTX = CA.server_context(CA.issue(SERVER_ID))


def flag_of(e: HboneConnectError) -> str:
    return CONNECT_FAILURE_FLAGS[e.stage]


@pytest.fixture
async def pool() -> AsyncIterator[HboneConnectionPool]:
    p = HboneConnectionPool(stats=TunnelStats())
    yield p
    await p.close()


async def _open(pool: HboneConnectionPool, server: HboneServer, dst: Identity = SERVER_ID) -> Any:
    return await pool.open_stream(PoolKey(CLIENT_ID, dst, server.addr), CLIENT_CTX, "127.0.0.1:1", [])


# ---------------------------------------------------------------------------------------------------- opening


@pytest.mark.parametrize("status", [401, 400, 503])
async def test_a_peers_refusal_is_connect_not_deny(pool: HboneConnectionPool, status: int) -> None:
    """Error::HttpStatus falls through to CONNECT: the source reports a 401 as CONNECT; DENY is the destination's
    (its AuthorizationPolicyRejection)."""
    server = await HboneServer(SERVER_CTX, status=status).start()
    try:
        with pytest.raises(HboneConnectError) as err:
            await _open(pool, server)
    finally:
        await server.close()
    assert (err.value.status, err.value.stage, flag_of(err.value)) == (status, ConnectStage.RESPONSE, "CONNECT")


async def test_a_refused_tcp_connect_is_connect(pool: HboneConnectionPool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(HboneConnectError) as err:
        await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, ("127.0.0.1", port)), CLIENT_CTX, "x:1", [])
    assert (err.value.stage, flag_of(err.value)) == (ConnectStage.TCP, "CONNECT")


@pytest.mark.parametrize("raised", [TimeoutError("connect timed out after 5 s"), OSError(110, "timed out")])
async def test_a_tcp_connect_timeout_is_network_policy(
    pool: HboneConnectionPool, monkeypatch: pytest.MonkeyPatch, raised: Exception
) -> None:
    """pool.rs: io::ErrorKind::TimedOut from the connect is MaybeHBONENetworkPolicyError ("maybe a
    NetworkPolicy is blocking HBONE port 15008")."""

    async def times_out(*_: Any, **__: Any) -> socket.socket:
        raise raised

    monkeypatch.setattr(pool, "dial", times_out)
    with pytest.raises(HboneConnectError) as err:
        await pool.open_stream(PoolKey(CLIENT_ID, SERVER_ID, ("127.0.0.1", 9)), CLIENT_CTX, "x:1", [])
    assert (err.value.stage, flag_of(err.value)) == (ConnectStage.TCP_TIMEOUT, "NETWORK_POLICY")


async def test_tls_handshake_and_identity_failures_are_connect(pool: HboneConnectionPool) -> None:
    """The TLS connector's failure is an io::Error, which `?` makes Error::Io: CONNECT, not TLS_FAILURE."""
    other = TestCA()
    untrusted = await HboneServer(other.server_context(other.issue(SERVER_ID))).start()
    trusted = await HboneServer(SERVER_CTX).start()
    try:
        with pytest.raises(HboneConnectError) as bad_chain:
            await _open(pool, untrusted)
        with pytest.raises(HboneConnectError) as wrong_peer:
            await _open(pool, trusted, CA.identity("default", "somebody-else"))
    finally:
        await untrusted.close()
        await trusted.close()
    for err in (bad_chain, wrong_peer):
        assert (err.value.stage, flag_of(err.value)) == (ConnectStage.TLS, "CONNECT")


@pytest.mark.parametrize("how", ["reset", "lost", "goaway"])
async def test_http2_failures_before_the_response_are_h2_handshake_failure(pool: HboneConnectionPool, how: str) -> None:
    """client.rs: a request that fails in h2 (stream reset, connection gone) is Error::H2 -> H2_HANDSHAKE_FAILURE."""

    async def handler(req: ConnectRequest) -> None:
        if how == "reset":
            req._proto.h2.reset_stream(req.stream_id, ErrorCode.INTERNAL_ERROR)
            req._proto.flush()
        elif how == "goaway":
            req._proto.close(ErrorCode.PROTOCOL_ERROR)
        else:
            assert req._proto.transport is not None
            req._proto.transport.abort()
        await asyncio.sleep(3600)

    server = await HboneServer(SERVER_CTX, handler=handler).start()
    try:
        with pytest.raises(HboneConnectError) as err:
            await _open(pool, server)
    finally:
        await server.close()
    assert (err.value.stage, flag_of(err.value)) == (ConnectStage.HTTP2, "H2_HANDSHAKE_FAILURE")


# ---------------------------------------------------------------------------------------------------- relaying


async def _relay_to(server: HboneServer, pool: HboneConnectionPool) -> tuple[socket.socket, asyncio.Task[Any]]:
    """A real TCP client (loopback) whose agent-side socket is relayed into a stream to ``server``."""
    loop = asyncio.get_running_loop()
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.setblocking(False)
        app = socket.socket()
        app.setblocking(False)
        await loop.sock_connect(app, lsock.getsockname())
        side, _ = await loop.sock_accept(lsock)
    stream = await _open(pool, server)
    return app, asyncio.ensure_future(relay(side, stream))


async def _answer_then(action: str, req: ConnectRequest) -> None:
    await req.respond(200)
    await req.stream.read()
    proto = req._proto
    if action in ("cancel", "no_error_early", "internal_error"):
        code = {"cancel": ErrorCode.CANCEL, "no_error_early": ErrorCode.NO_ERROR}.get(action, ErrorCode.INTERNAL_ERROR)
        proto.h2.reset_stream(req.stream_id, code)
        proto.flush()
    elif action == "abort":
        assert proto.transport is not None
        proto.transport.abort()
    elif action == "goaway_error":
        proto.close(ErrorCode.PROTOCOL_ERROR)
    await asyncio.sleep(3600)


@pytest.mark.parametrize(
    ("action", "failed"),
    [
        ("cancel", False),  # h2.rs: CANCEL reads as EOF, writes as a broken pipe
        ("no_error_early", False),
        ("abort", False),  # the peer's connection reset: h2 hands the io error on, ignore_io_errors drops it
        ("internal_error", True),  # any other reset code is an error (io::Error::other)
        ("goaway_error", True),  # streams cut by a GOAWAY with an error code: h2's GoAway error
    ],
)
async def test_how_the_peer_ends_a_relayed_stream(pool: HboneConnectionPool, action: str, failed: bool) -> None:
    server = await HboneServer(SERVER_CTX, handler=lambda req: _answer_then(action, req)).start()
    try:
        app, relaying = await _relay_to(server, pool)
        try:
            app.send(b"hello")
            result: RelayResult = await asyncio.wait_for(relaying, 10)
        finally:
            app.close()
    finally:
        await server.close()
    assert result.error is not None, "it did not end cleanly: the relay says how"
    assert (result.failure is not None) == failed, result


async def test_a_client_that_resets_is_not_a_failure(pool: HboneConnectionPool) -> None:
    """The TCP client closes with RST (SO_LINGER 0): ECONNRESET is ignore_io_errors' ConnectionReset."""
    server = await HboneServer(SERVER_CTX, handler=lambda req: _answer_then("hold", req)).start()
    try:
        app, relaying = await _relay_to(server, pool)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()
        result: RelayResult = await asyncio.wait_for(relaying, 10)
    finally:
        await server.close()
    assert result.error is not None and "reset" in result.error.lower()
    assert result.ungraceful and result.failure is None


def test_which_os_errors_end_a_connection_ungracefully() -> None:
    assert tunnel.ungraceful(ConnectionResetError("Connection lost"))  # asyncio's, without an errno
    assert tunnel.ungraceful(OSError(104, "reset")) and tunnel.ungraceful(OSError(32, "pipe"))
    assert tunnel.ungraceful(OSError(107, "not connected"))
    assert tunnel.ungraceful(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"))
    assert not tunnel.ungraceful(OSError(110, "timed out")) and not tunnel.ungraceful(OSError(113, "no route"))
    assert not tunnel.ungraceful(ssl.SSLError(1, "bad record mac")) and not tunnel.ungraceful(ValueError())


# ---------------------------------------------------------------------------------------------------- reports


async def _inbound(
    monkeypatch: pytest.MonkeyPatch, result: RelayResult, caplog: pytest.LogCaptureFixture
) -> tuple[Metrics, logging.LogRecord]:
    store, metrics, registry = server_registry()
    proxy = InboundProxy(store, _Certs(), "n2", metrics, AccessLog(metrics), registry)

    fake_pod_and_relay(monkeypatch, result)
    req = _FakeRequest("10.2.0.7:8080", CURL)
    server_id = Identity("cluster.local", "server", "default")
    with caplog.at_level(logging.INFO, logger="access"):
        await proxy._connect(req, SERVER, server_id, ("10.2.0.7", 15008), ("10.1.0.6", 1))  # type: ignore[arg-type]
    [line] = [r for r in caplog.records if r.name == "access"]
    return metrics, line


async def test_inbound_ungraceful_end_is_a_complete_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ended = RelayResult(5, 7, "tcp read: [Errno 104] Connection reset by peer", ungraceful=True)
    metrics, line = await _inbound(monkeypatch, ended, caplog)
    assert line.levelno == logging.INFO and "error" not in line.fields  # type: ignore[attr-defined]
    assert line.fields["response_flags"] == "-"  # type: ignore[attr-defined]
    assert sample_value(metrics, "istio_tcp_connections_closed_total", {"response_flags": "-"}) == 1
    assert sample_value(metrics, "istio_tcp_connections_failed_total") == 0


async def test_inbound_relay_failure_is_connect(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """copy_bidirectional's SendError/ReceiveError fall through extract_failure_reason to CONNECT."""
    broken = RelayResult(5, 7, "stream reset: peer reset: INTERNAL_ERROR")
    metrics, line = await _inbound(monkeypatch, broken, caplog)
    assert line.levelno == logging.ERROR and line.fields["response_flags"] == "CONNECT"  # type: ignore[attr-defined]
    assert sample_value(metrics, "istio_tcp_connections_failed_total", {"response_flags": "CONNECT"}) == 1


async def test_inbound_connect_abandoned_by_the_client_is_h2_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ztunnel's handler runs on after the client's RST_STREAM and fails in send_response (an h2::Error, so
    Error::H2): H2_HANDSHAKE_FAILURE."""

    async def gone(self: Any, status: int, headers: Any = None) -> None:
        raise tunnel.HboneStreamReset("peer reset: CANCEL")

    monkeypatch.setattr(_FakeRequest, "respond", gone)
    _, line = await _inbound(monkeypatch, RelayResult(0, 0, None), caplog)
    assert line.fields["error"] == ABANDONED  # type: ignore[attr-defined]
    assert line.fields["response_flags"] == "H2_HANDSHAKE_FAILURE"  # type: ignore[attr-defined]


class _Pool:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def open_stream(self, *_: Any, **__: Any) -> Any:
        raise self.error


class _ClientCerts:
    trust_domain = "cluster.local"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def client_context(self, ident: Identity) -> Any:
        if self.error is not None:
            raise self.error
        return object()


CLIENT = wpb.Workload(
    uid="Kubernetes//Pod/client/sleep-1",
    name="sleep-1",
    namespace="client",
    service_account="sleep",
    addresses=[ipaddress.ip_address("10.1.0.6").packed],
    node="n1",
    tunnel_protocol=wpb.HBONE,
)


async def _outbound(certs: _ClientCerts, pool: Any) -> tuple[Metrics, dict[str, Any]]:
    store = WorkloadStore()
    store.put([CLIENT, SERVER])
    metrics = Metrics()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("access.test_flags")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    try:
        proxy = OutboundProxy(
            store, certs, pool, "n1", metrics, AccessLog(metrics, logger), ConnectionRegistry(store, metrics)
        )
        route = Route(RouteKind.HBONE, ("10.2.0.7", 15008), ("10.2.0.7", 8080), SERVER)
        report = proxy.access_log.start("outbound", ("10.1.0.6", 40000), ("10.2.0.7", 15008), src=CLIENT, dst=SERVER)
        report.src_identity = Identity("cluster.local", "client", "sleep")
        report.dst_identity = Identity("cluster.local", "server", "default")
        report.mtls = True
        app, side = socket.socketpair()
        with app:
            await proxy._hbone(side, ("10.1.0.6", 40000), CLIENT, route, report)
    finally:
        logger.removeHandler(handler)
    [line] = records
    return metrics, line.fields  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("stage", "status", "flag"),
    [
        (ConnectStage.RESPONSE, 401, "CONNECT"),
        (ConnectStage.TCP_TIMEOUT, 503, "NETWORK_POLICY"),
        (ConnectStage.TLS, 503, "CONNECT"),
        (ConnectStage.HTTP2, 503, "H2_HANDSHAKE_FAILURE"),
    ],
)
async def test_outbound_reports_the_flag_of_the_failure(stage: ConnectStage, status: int, flag: str) -> None:
    metrics, fields = await _outbound(_ClientCerts(), _Pool(HboneConnectError(status, "x", stage=stage)))
    assert fields["response_flags"] == flag
    sel = {"reporter": "source", "response_flags": flag}
    assert sample_value(metrics, "istio_tcp_connections_failed_total", sel) == 1
    assert sample_value(metrics, "istio_tcp_connections_closed_total", {"response_flags": "DENY"}) == 0


async def test_outbound_certificate_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch_certificate failing is Error::Identity (IDENTITY_ERROR); a certificate that cannot be made into a
    client TLS configuration is Error::Tls (TLS_FAILURE), the one case ztunnel labels so."""
    never = _Pool(AssertionError("no tunnel without a certificate"))
    _, fields = await _outbound(_ClientCerts(CertificateUnavailable("CA down")), never)
    assert fields["response_flags"] == "IDENTITY_ERROR"
    _, fields = await _outbound(_ClientCerts(ssl.SSLError(9, "PEM lib")), never)
    assert fields["response_flags"] == "TLS_FAILURE"
