"""Label values of the agent's own counters come from a fixed set, never from what a peer sends or from an error
message: a Prometheus series per value a peer can choose is a cardinality attack, and a label cut out of free
text changes whenever the text does (ambit_hbone_rejects, ambit_hbone_errors, ambit_connection_errors)."""

from __future__ import annotations

from typing import Any

import pytest

from agent import hbone, tunnel
from agent.hbone import ErrorCode
from agent.outbound import connect_error_reason
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import ERROR_REASONS, REJECT_REASONS, HboneConnectError, TunnelConfig, TunnelStats
from common.tls import PeerVerificationError
from tests.support.hbone_testbed import HboneServer
from tests.support.pki import TestCA
from tests.support.waiting import eventually


async def test_goaway_codes_a_peer_sends_are_a_bounded_label() -> None:
    """GOAWAY carries a 32-bit code of the peer's choosing: the 14 HTTP/2 codes keep their names, the rest of the
    2^32 share one label."""
    stats = TunnelStats()
    proto = tunnel._ClientProtocol(TestCA().identity("default", "server"), TunnelConfig(), stats)
    for code in (0xDEADBEEF, 0x1234, 0xFFFFFFFF, ErrorCode.PROTOCOL_ERROR, ErrorCode.ENHANCE_YOUR_CALM):
        proto.on_terminated(hbone.ConnectionTerminated(code, 0, remote=True, reason="x" * 5000))
    assert dict(stats.errors) == {"goaway_unknown": 3, "goaway_protocol_error": 1, "goaway_enhance_your_calm": 1}
    assert set(stats.errors) <= ERROR_REASONS


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize(
    "message",
    [
        "peer spiffe://cluster.local/ns/a/sa/b is not one of ['spiffe://cluster.local/ns/a/sa/c']",
        "peer spiffe://other.domain/ns/a/sa/b is not in trust domain cluster.local",
        "peer certificate has no SPIFFE URI SAN",
        "wrong_identity",
        "",
    ],
)
async def test_a_refused_peer_is_counted_by_a_fixed_reason_whatever_the_message(
    monkeypatch: pytest.MonkeyPatch, side: str, message: str
) -> None:
    """The reason is what the check decided (wrong_identity on the client, trust_domain or untrusted_peer on the
    server, from the certificate itself), not the text before the first ':' of an error message."""
    ca = TestCA()
    server_id, client_id = ca.identity("default", "server"), ca.identity("default", "client")
    server = await HboneServer(ca.server_context(ca.issue(server_id))).start()
    pool = HboneConnectionPool(stats=TunnelStats())
    real = tunnel.verify_peer

    def refuse(sslobj: Any, **kw: Any) -> Any:
        if (kw.get("expected") is not None) == (side == "client"):  # the client names whom it expects
            raise PeerVerificationError(message)
        return real(sslobj, **kw)

    monkeypatch.setattr(tunnel, "verify_peer", refuse)
    try:
        with pytest.raises(HboneConnectError):
            stream = await pool.open_stream(
                PoolKey(client_id, server_id, server.addr), ca.client_context(ca.issue(client_id)), "x:1", []
            )
            await stream.read()  # the server refused after its handshake: the stream dies with the connection
        if side == "server":
            await eventually(lambda: server.stats.rejects, "the server's reject count")
    finally:
        await pool.close()
        await server.close()
    if side == "client":
        assert dict(pool.stats.rejects) == {"wrong_identity": 1}
    else:
        assert dict(server.stats.rejects) == {"untrusted_peer": 1}  # the client's certificate is of our domain


async def test_a_client_of_another_trust_domain_is_counted_as_such() -> None:
    ca = TestCA()
    server_id, client_id = ca.identity("default", "server"), ca.identity("default", "client")
    server = await HboneServer(ca.server_context(ca.issue(server_id)), trust_domain="other.local").start()
    pool = HboneConnectionPool(stats=TunnelStats())
    try:
        with pytest.raises(HboneConnectError):
            await pool.open_stream(
                PoolKey(client_id, server_id, server.addr), ca.client_context(ca.issue(client_id)), "x:1", []
            )
        await eventually(lambda: server.stats.rejects, "the server's reject count")
    finally:
        await pool.close()
        await server.close()
    assert dict(server.stats.rejects) == {"trust_domain": 1}


async def test_a_verification_bug_is_its_own_reason() -> None:
    stats = TunnelStats()
    proto = tunnel._ClientProtocol(TestCA().identity("default", "server"), TunnelConfig(), stats)

    class Broken:
        def get_extra_info(self, name: str) -> object:
            raise RuntimeError("boom: spiffe://x")

        def abort(self) -> None:
            pass

    proto.connection_made(Broken())  # type: ignore[arg-type]
    with pytest.raises(PeerVerificationError) as err:
        await proto.ready
    assert err.value.reason == "verify_error"  # type: ignore[attr-defined]
    assert "verify_error" in REJECT_REASONS


def test_every_reason_the_core_refuses_with_is_in_the_set() -> None:
    """Requests the HTTP/2 core refuses (RequestRejected) and resets it counts name their reason before ':'; a
    reason the set does not know is counted as protocol_error rather than as a new label."""
    assert tunnel.reject_reason("header_too_large: request header list of 99999 bytes") == "header_too_large"
    assert tunnel.reject_reason("bad_request: method GET is not CONNECT") == "bad_request"
    assert tunnel.reject_reason("refused_stream") == "refused_stream"
    assert tunnel.reject_reason("malformed_response: invalid :status 'abc'") == "malformed_response"
    assert tunnel.reject_reason("peer spiffe://cluster.local/ns/a/sa/b") == "protocol_error"
    assert tunnel.reject_reason("something new: detail") == "protocol_error"


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "hbone_401"), (400, "hbone_400"), (503, "hbone_503"), (999, "hbone_other"), (299, "hbone_other")],
)
def test_outbound_counts_a_peers_status_as_a_bounded_reason(status: int, reason: str) -> None:
    """ambit_connection_errors{reason="hbone_<status>"}: the status is the peer's to choose (any 3 digits)."""
    assert connect_error_reason(HboneConnectError(status, "x")) == reason
