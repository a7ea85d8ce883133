"""Passthrough keeps the caller's address where ztunnel's would: ztunnel connects from inside the client pod, so a
pod outside the mesh sees the client pod's IP (what its NetworkPolicy and logs go by). The agent connects from the
node, and now binds the client's address for destinations that are pods (their replies come back through a hook
that hands them to the agent); anything else (a WorkloadEntry or ServiceEntry endpoint, an address no workload
owns, a PASSTHROUGH service) may sit behind NAT and still sees the node (tests/integration/proxy_mesh.py's
loopback two-node mesh)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import pytest

from api.istio.workload import workload_pb2 as wpb
from tests.integration.proxy_mesh import Mesh
from tests.support.proxy_echo import connect_from

WHO_PORT = 8181


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


async def who_server(ip: str) -> asyncio.Server:
    """Answers every connection with the address it came from."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(str(writer.get_extra_info("peername")[0]).encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, ip, WHO_PORT)


async def caller_seen(mesh: Mesh, dst_ip: str) -> str:
    sock = await connect_from(mesh.ip["client"], mesh.n1.capture_outbound((dst_ip, WHO_PORT)))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        return (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()


async def test_a_pod_outside_the_mesh_sees_the_calling_pod(mesh: Mesh) -> None:
    entry_ip = mesh.net + "40"
    mesh.store.put(
        [
            wpb.Workload(
                uid="Kubernetes/networking.istio.io/WorkloadEntry/legacy/vm",
                name="vm",
                namespace="legacy",
                addresses=[ipaddress.ip_address(entry_ip).packed],
            )
        ]
    )
    servers = [await who_server(ip) for ip in (mesh.ip["legacy"], entry_ip, mesh.ip["stranger"])]
    try:
        assert await caller_seen(mesh, mesh.ip["legacy"]) == mesh.ip["client"]  # was the node's (here 127.0.0.1)
        assert await caller_seen(mesh, entry_ip) != mesh.ip["client"]
        assert await caller_seen(mesh, mesh.ip["stranger"]) != mesh.ip["client"]
    finally:
        for s in servers:
            s.close()
    await mesh.settled()
