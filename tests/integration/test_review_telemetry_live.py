"""Byte counters move while a connection lasts (ztunnel adds every write to them, src/copy.rs), on every path:
HBONE (both reporters), same node (both reporters), passthrough and plaintext into a pod. Loopback mesh of
tests/integration/proxy_mesh.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.metrics import sample_value
from tests.integration.proxy_mesh import ECHO_PORT, Agent, Mesh
from tests.support.proxy_echo import connect_from

SENT = 300_000


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


async def _open_and_echo(mesh: Mesh, pod: str, captured: tuple[str, int]) -> asyncio.StreamWriter:
    """A connection that moved SENT bytes each way and stays open."""
    reader, writer = await asyncio.open_connection(sock=await connect_from(mesh.ip[pod], captured))
    writer.write(b"x" * SENT)
    await writer.drain()
    got = 0
    async with asyncio.timeout(20):
        while got < SENT:
            got += len(await reader.read(1 << 16))
    return writer


def _bytes(agent: Agent, reporter: str, **labels: str) -> tuple[float, float]:
    sel = {"reporter": reporter, **labels}
    return (
        sample_value(agent.metrics, "istio_tcp_received_bytes_total", sel),
        sample_value(agent.metrics, "istio_tcp_sent_bytes_total", sel),
    )


async def _still_open_then_closed(mesh: Mesh, writer: asyncio.StreamWriter, *checks: tuple[Agent, str]) -> None:
    for agent, reporter in checks:
        assert _bytes(agent, reporter) == (SENT, SENT), reporter  # while open
    assert sample_value(checks[0][0].metrics, "istio_tcp_connections_closed_total") == 0
    writer.close()
    await mesh.settled()
    for agent, reporter in checks:
        assert _bytes(agent, reporter) == (SENT, SENT), reporter  # nothing counted twice at close


async def test_hbone_bytes_show_while_open(mesh: Mesh) -> None:
    writer = await _open_and_echo(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
    await _still_open_then_closed(mesh, writer, (mesh.n1, "source"), (mesh.n2, "destination"))


async def test_same_node_bytes_show_while_open(mesh: Mesh) -> None:
    writer = await _open_and_echo(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-2"], ECHO_PORT)))
    await _still_open_then_closed(mesh, writer, (mesh.n1, "source"), (mesh.n1, "destination"))


async def test_passthrough_and_plaintext_bytes_show_while_open(mesh: Mesh) -> None:
    writer = await _open_and_echo(mesh, "client", mesh.n1.capture_outbound((mesh.ip["legacy"], ECHO_PORT)))
    await _still_open_then_closed(mesh, writer, (mesh.n1, "source"))
    writer = await _open_and_echo(mesh, "legacy", mesh.n2.capture_plaintext((mesh.ip["echo-1"], ECHO_PORT)))
    await _still_open_then_closed(mesh, writer, (mesh.n2, "destination"))
