"""Expiry of a deleted workload's series with real traffic: two clients' connections cross the loopback mesh of
tests/integration/proxy_mesh.py (HBONE, mutual TLS) to echo-1; one client's workload is then deleted from the state
(as an xDS delta removes it). Once its series stopped changing for the interval they leave the destination agent's
gzipped scrape, while the live client's stay and keep counting. The clock is the test's."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics_expiry import SeriesExpiry
from agent.state import ADDRESS_TYPE
from tests.integration.proxy_mesh import ECHO_PORT, Mesh
from tests.support.proxy_echo import connect_from

INTERVAL = 300.0


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


async def _echo_once(mesh: Mesh, pod: str) -> None:
    captured = mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT))
    reader, writer = await asyncio.open_connection(sock=await connect_from(mesh.ip[pod], captured))
    writer.write(b"ping")
    await writer.drain()
    async with asyncio.timeout(20):
        assert await reader.readexactly(4) == b"ping"
    writer.close()
    await mesh.settled()


async def _scrape(port: int) -> dict[tuple[str, str], float]:
    """istio_tcp_connections_opened_total of the destination agent by source workload, from a gzipped scrape."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: n2\r\nAccept-Encoding: gzip\r\n\r\n")
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert b"Content-Encoding: gzip" in head
    opened = {}
    for family in text_string_to_metric_families(gzip.decompress(body).decode()):
        for s in family.samples:
            if s.name == "istio_tcp_connections_opened_total":
                opened[(s.labels["source_workload"], s.labels["reporter"])] = s.value
    return opened


async def test_a_deleted_clients_series_leave_the_scrape_and_a_live_ones_stay(mesh: Mesh) -> None:
    now = [0.0]
    expiry = SeriesExpiry(mesh.n2.metrics, mesh.store.all_workloads, INTERVAL, clock=lambda: now[0])
    mesh.n2.metrics.registry.register(expiry)
    port = await mesh.n2.start_metrics()
    await _echo_once(mesh, "client")  # sleep
    await _echo_once(mesh, "other")  # curl
    assert await _scrape(port) == {("sleep", "destination"): 1, ("curl", "destination"): 1}

    mesh.store.apply(ADDRESS_TYPE, {}, removed=[mesh.workloads["client"].uid])
    assert await expiry.sweep() == 0
    now[0] += INTERVAL
    assert await expiry.sweep() == 4  # sleep's opened, closed, received and sent on n2
    assert await _scrape(port) == {("curl", "destination"): 1}

    await _echo_once(mesh, "other")
    now[0] += INTERVAL
    assert await expiry.sweep() == 0
    assert await _scrape(port) == {("curl", "destination"): 2}
    text = (await mesh.n2.metrics.render())[0].decode()
    assert "ambit_metric_series_expired_total 4.0" in text
