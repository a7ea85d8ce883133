"""A ServiceEntry with `resolution: DNS` through real agents (tests/integration/proxy_mesh.py: real listeners, real
mTLS/HBONE): its endpoint is a workload with a hostname and no address, as istiod sends it, resolved when a
connection picks it.

The plain-TCP case goes through the real system resolver: the endpoint is `localhost`, which /etc/hosts answers
(nsswitch reads files before DNS), so no query leaves the machine and the upstream is on 127.0.0.1. The HBONE and
failure cases inject the resolver (a made-up name cannot be resolved without a DNS server or an /etc/hosts edit).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from agent.metrics import sample_value
from agent.ondemand_dns import OnDemandResolver
from api.istio.workload import workload_pb2 as wpb
from tests.integration.proxy_mesh import ECHO_PORT, Mesh
from tests.support.proxy_echo import connect_from, echo_server, exchange_socket

HOST = "api.example.com"
PORT = 443


def dns_service(mesh: Mesh) -> wpb.Service:
    return wpb.Service(
        name="api",
        namespace="external",
        hostname=HOST,
        addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(mesh.net + "110").packed)],
        ports=[wpb.Port(service_port=PORT)],
    )


def dns_endpoint(hostname: str, target: int, *, hbone: bool = False, sa: str = "") -> wpb.Workload:
    """As istiod builds a DNS ServiceEntry's endpoint (serviceentries.go): a hostname, no address."""
    return wpb.Workload(
        uid=f"Kubernetes/networking.istio.io/ServiceEntry/external/api/{hostname}",
        name="api",
        namespace="server" if hbone else "external",
        service_account=sa,
        hostname=hostname,
        tunnel_protocol=wpb.HBONE if hbone else wpb.NONE,
        services={f"external/{HOST}": wpb.PortList(ports=[wpb.Port(service_port=PORT, target_port=target)])},
    )


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


async def refused(mesh: Mesh, captured: tuple[str, int]) -> bool:
    reader, writer = await asyncio.open_connection(sock=await connect_from(mesh.ip["client"], captured))
    try:
        writer.write(b"hello?")
        async with asyncio.timeout(10):
            return await reader.read() == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def test_dns_endpoint_resolved_by_the_system_resolver_and_cached(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await echo_server("127.0.0.1", 0)  # the "external" server: `localhost` in /etc/hosts
    mesh.servers.append(upstream)
    port = upstream.sockets[0].getsockname()[1]
    mesh.store.put([dns_service(mesh), dns_endpoint("localhost", port)])
    captured = mesh.n1.capture_outbound((mesh.net + "110", PORT))
    with caplog.at_level(logging.INFO, logger="access.n1"):
        for size in (100_000, 7):
            result = await exchange_socket(await connect_from(mesh.ip["client"], captured), size)
            assert result.received == size and result.intact
        await mesh.settled()
    assert mesh.n1.outbound.resolver.lookups == 1  # the second connection used the cached answer
    asked = {"hostname": "localhost", "source_workload": "sleep", "source_principal": str(mesh.identity("client"))}
    assert sample_value(mesh.n1.metrics, "istio_on_demand_dns_total", asked) == 2  # per connection, as ztunnel
    labels = {"destination_service": HOST, "response_flags": "-", "connection_security_policy": "unknown"}
    assert sample_value(mesh.n1.metrics, "istio_tcp_connections_closed_total", labels) == 2
    lines = [r for r in caplog.records if r.name == "access.n1" and r.getMessage() == "connection complete"]
    assert [r.__dict__["fields"]["dst.addr"] for r in lines] == [f"127.0.0.1:{port}"] * 2


async def test_dns_endpoint_in_the_mesh_is_reached_over_hbone_at_the_resolved_address(mesh: Mesh) -> None:
    asked: list[str] = []

    async def resolve(hostname: str) -> list[str]:  # the VM's name resolves to echo-1's address (node n2)
        asked.append(hostname)
        return ["2001:db8::20", mesh.ip["echo-1"]]  # the client dialled IPv4: the IPv4 answer is chosen

    mesh.n1.outbound.resolver = OnDemandResolver(resolve)
    mesh.store.put([dns_service(mesh), dns_endpoint("vm.example.internal", ECHO_PORT, hbone=True, sa="echo")])
    captured = mesh.n1.capture_outbound((mesh.net + "110", PORT))
    result = await exchange_socket(await connect_from(mesh.ip["client"], captured), 50_000)
    assert result.received == 50_000 and result.intact
    await mesh.settled()
    assert asked == ["vm.example.internal"]
    mtls = {"destination_service": HOST, "connection_security_policy": "mutual_tls"}
    assert sample_value(mesh.n1.metrics, "istio_tcp_connections_closed_total", {**mtls, "reporter": "source"}) == 1
    assert sample_value(mesh.n2.metrics, "istio_tcp_connections_closed_total", {"reporter": "destination"}) == 1


async def test_a_name_that_does_not_resolve_refuses_the_connection_counted_and_logged(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    async def resolve(hostname: str) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    mesh.n1.outbound.resolver = OnDemandResolver(resolve)
    mesh.store.put([dns_service(mesh), dns_endpoint("gone.example.internal", 8443)])
    captured = mesh.n1.capture_outbound((mesh.net + "110", PORT))
    with caplog.at_level(logging.WARNING, logger="access.n1"):
        assert await refused(mesh, captured)
        await mesh.settled()
    errors = {"direction": "outbound", "reason": "dns_resolution_failed"}
    assert sample_value(mesh.n1.metrics, "ambit_connection_errors_total", errors) == 1
    assert sample_value(mesh.n1.metrics, "istio_on_demand_dns_total", {"hostname": "gone.example.internal"}) == 1
    assert sample_value(mesh.n1.metrics, "istio_tcp_connections_opened_total") == 0  # an early failure, as ztunnel
    [line] = [r.__dict__["fields"] for r in caplog.records if r.name == "access.n1"]
    assert (line["error"], line["dst.hostname"]) == ("dns_resolution_failed", "gone.example.internal")
    assert "not known" in line["cause"]
