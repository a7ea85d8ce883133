"""A WorkloadEntry naming enrolled pods' addresses (any namespace may create one) does not take their place: the
client pod keeps its identity on outbound and the destination pod keeps serving its own certificate on inbound, as
ztunnel's by-address lookup prefers Pods (tests/integration/proxy_mesh.py's loopback two-node mesh)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest

from agent.metrics import sample_value
from api.istio.workload import workload_pb2 as wpb
from tests.integration.proxy_mesh import ECHO_PORT, Mesh
from tests.support.proxy_echo import connect_from, exchange_socket


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


def entry(name: str, ip: str) -> wpb.Workload:
    return wpb.Workload(
        uid=f"Kubernetes/networking.istio.io/WorkloadEntry/tenant/{name}",
        name=name,
        namespace="tenant",
        service_account="intruder",
        addresses=[ipaddress.ip_address(ip).packed],
        tunnel_protocol=wpb.HBONE,
    )


async def test_workload_entries_at_pod_addresses_do_not_shadow_the_pods(mesh: Mesh) -> None:
    mesh.store.put([entry("as-client", mesh.ip["client"]), entry("as-echo", mesh.ip["echo-1"])])
    sock = await connect_from(mesh.ip["client"], mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
    assert (await exchange_socket(sock, 100_000)).intact
    await mesh.settled()
    opened = {
        "reporter": "destination",
        "source_principal": str(mesh.identity("client")),
        "destination_principal": str(mesh.identity("echo-1")),
    }
    assert sample_value(mesh.n2.metrics, "istio_tcp_connections_opened_total", opened) == 1
    assert sample_value(mesh.n1.metrics, "ambit_connection_errors_total") == 0
