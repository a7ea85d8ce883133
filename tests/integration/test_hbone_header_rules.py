"""Header-list rules over real mTLS connections (tests/unit/test_hbone_headers.py pins them down frame by frame).

A malformed CONNECT response fails that CONNECT with a reason saying what was wrong, and the pooled connection
keeps serving. An oversized CONNECT header list sent by our client to a real Envoy HBONE server and to ours:

* Envoy (its default max_request_headers_kb, 60) resets that stream with INTERNAL_ERROR, however big the list;
  the connection and its other streams carry on.
* We follow h2 (ztunnel): above SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB) the stream is answered 431 and the
  connection carries on; above the hard limit (twice that) the block is not decoded any further and the connection
  is closed (GOAWAY), where Envoy would still reset just the stream. A list that big is no HBONE client's.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from hpack import Encoder, NeverIndexedHeaderTuple

from agent import hbone
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import HboneConnectError, HboneStreamReset, TunnelStats
from bench.certs import CLIENT_ID, SERVER_ID
from bench.drivers.envoy_pair import HBONE_PORT, server_config
from tests.integration.test_hbone_envoy import Site
from tests.support.hbone_testbed import Backend, HboneServer, roundtrip

# Fields of ~3 KB: 32 of them (~97 KB) are above both servers' limits and below our hard limit (128 KiB); 70
# (~213 KB) are above that too.
OVER_LIMIT = 32
OVER_HARD_LIMIT = 70


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("hbone-header-limits"))
    try:
        s.envoys.start(
            "envoy-server", server_config(s.certs, s.addrs(s.envoy_server_ip)), (s.envoy_server_ip, HBONE_PORT)
        )
        yield s
    finally:
        s.envoys.stop()


@pytest.fixture
async def echo() -> AsyncIterator[Backend]:
    backend = await Backend().start()
    yield backend
    await backend.close()


@dataclass
class Outcome:
    error: HboneConnectError  # what opening the oversized stream raised
    neighbour_survived: bool  # the stream opened before it on the same connection still echoes
    connections: int  # HBONE connections the pool needed for all of it (1: the connection was kept)


async def _oversized_between_two_streams(site: Site, addr: tuple[str, int], echo: Backend, fields: int) -> Outcome:
    """Open a stream, then one whose header list is ``fields`` x 3 KB, then use the first and open a third."""
    pool = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(CLIENT_ID, SERVER_ID, addr)
    ctx = site.ca.client_context(site.client_leaf)
    big = [(f"x-big-{i}", "v" * 3000) for i in range(fields)]
    try:
        first = await pool.open_stream(key, ctx, echo.addr, [])
        with pytest.raises(HboneConnectError) as err:
            await pool.open_stream(key, ctx, echo.addr, big)
        payload = os.urandom(100_000)
        try:
            survived = await roundtrip(first, payload) == payload
        except HboneStreamReset:
            survived = False
        third = await pool.open_stream(key, ctx, echo.addr, [("forwarded", 'for="127.0.0.1"')])
        assert await roundtrip(third, b"after") == b"after"
        return Outcome(err.value, survived, pool.connections_created)
    finally:
        await pool.close()


@pytest.mark.parametrize("fields", [OVER_LIMIT, OVER_HARD_LIMIT])
async def test_envoy_resets_an_oversized_request_and_keeps_the_connection(
    site: Site, echo: Backend, fields: int
) -> None:
    out = await _oversized_between_two_streams(site, (site.envoy_server_ip, HBONE_PORT), echo, fields)
    assert (out.error.status, out.error.reason) == (503, "peer reset: INTERNAL_ERROR")
    assert out.neighbour_survived and out.connections == 1


async def test_our_server_answers_431_and_keeps_the_connection(site: Site, echo: Backend) -> None:
    ours = HboneServer(site.ca.server_context(site.server_leaf), bind=(site.ours_ip, HBONE_PORT))
    await ours.start()
    try:
        out = await _oversized_between_two_streams(site, (site.ours_ip, HBONE_PORT), echo, OVER_LIMIT)
        assert (out.error.status, out.error.reason) == (431, "peer answered 431")
        assert out.neighbour_survived and out.connections == 1
        assert ours.stats.rejects["header_too_large"] == 1 and len(ours.requests) == 2
    finally:
        await ours.close()


async def test_our_server_closes_the_connection_above_the_hard_limit(site: Site, echo: Backend) -> None:
    ours = HboneServer(site.ca.server_context(site.server_leaf), bind=(site.ours_ip, HBONE_PORT))
    await ours.start()
    try:
        out = await _oversized_between_two_streams(site, (site.ours_ip, HBONE_PORT), echo, OVER_HARD_LIMIT)
        assert out.error.status == 503 and not out.neighbour_survived and out.connections > 1
        assert ours.stats.rejects["header_too_large"] >= 1 and len(ours.requests) == 2
    finally:
        await ours.close()


# ---------------------------------------------------------------------------------------- malformed responses

MALFORMED = [
    ([(b"server", b"x")], "malformed_response: no :status"),
    (
        [(b":status", b"200"), (b":method", b"CONNECT")],
        "malformed_response: pseudo-header :method not allowed in a response",
    ),
    ([(b":status", b"\xb2\xb3\xb9")], "malformed_response: invalid :status '\xb2\xb3\xb9'"),
    ([(b":status", b"200"), (b"Server", b"x")], "malformed_response: invalid header name 'Server'"),
    ([(b":status", b"200"), (b"connection", b"close")], "malformed_response: connection-specific header connection"),
]


class MalformedAnswers:
    """An HBONE server (our sans-IO core over TLS) that answers each CONNECT with the next header list of
    ``answers`` as a raw HEADERS frame, and with a proper 200 once they are used up. The raw blocks are never-indexed
    literals, so the core's own HPACK context (the client's view of it) is left as it was."""

    def __init__(self, answers: list[list[tuple[bytes, bytes]]]) -> None:
        self.answers = list(answers)
        self.resets: list[hbone.StreamReset] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        core = hbone.HboneConnection(client=False)
        core.initiate()
        try:
            while data := await reader.read(65536):
                for ev in core.receive_data(data):
                    if isinstance(ev, hbone.RequestReceived):
                        writer.writelines(core.data_to_send())
                        if self.answers:
                            headers = [NeverIndexedHeaderTuple(n, v) for n, v in self.answers.pop(0)]
                            block = Encoder().encode(headers, huffman=False)
                            head = struct.pack(">L", len(block))[1:] + bytes([hbone.HEADERS, hbone.FLAG_END_HEADERS])
                            writer.write(head + struct.pack(">L", ev.stream_id) + block)
                        else:
                            core.send_response(ev.stream_id, 200)
                    elif isinstance(ev, hbone.StreamReset):
                        self.resets.append(ev)
                writer.writelines(core.data_to_send())
        finally:
            writer.close()


async def test_malformed_responses_fail_their_connect_and_keep_the_pooled_connection(site: Site) -> None:
    peer = MalformedAnswers([headers for headers, _ in MALFORMED])
    server = await asyncio.start_server(peer.serve, site.ours_ip, 0, ssl=site.ca.server_context(site.server_leaf))
    stats = TunnelStats()
    pool = HboneConnectionPool(stats=stats)
    key = PoolKey(CLIENT_ID, SERVER_ID, (site.ours_ip, server.sockets[0].getsockname()[1]))
    ctx = site.ca.client_context(site.client_leaf)
    try:
        for _, reason in MALFORMED:
            with pytest.raises(HboneConnectError) as err:
                await pool.open_stream(key, ctx, "127.0.0.1:9", [])
            assert (err.value.status, err.value.reason, err.value.retryable) == (503, reason, False)
        stream = await pool.open_stream(key, ctx, "127.0.0.1:9", [])
        assert stream.stream_id == 2 * len(MALFORMED) + 1 and pool.connections_created == 1
        # each malformed answer was reset by the client with PROTOCOL_ERROR, on its stream only
        for _ in range(100):
            if len(peer.resets) == len(MALFORMED):
                break
            await asyncio.sleep(0.02)
        assert [(r.stream_id, r.error_code) for r in peer.resets] == [
            (2 * i + 1, hbone.ErrorCode.PROTOCOL_ERROR) for i in range(len(MALFORMED))
        ]
        assert stats.rejects["malformed_response"] == len(MALFORMED)  # counted by reason, as refused requests are
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
