"""An oversized CONNECT header list sent by our client, over mTLS, to a real Envoy HBONE server and to ours.

What each does (the unit tests in tests/unit/test_hbone_headers.py pin ours down frame by frame):

* Envoy (its default max_request_headers_kb, 60) resets that stream with INTERNAL_ERROR, however big the list;
  the connection and its other streams carry on.
* We follow h2 (ztunnel): above SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB) the stream is answered 431 and the
  connection carries on; above the hard limit (twice that) the block is not decoded any further and the connection
  is closed (GOAWAY), where Envoy would still reset just the stream. A list that big is no HBONE client's.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

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
