"""Outbound -> HBONE -> inbound -> pod on a loopback two-node mesh (tests/integration/proxy_mesh.py):
exact bytes, policy (DENY, STRICT, late rejection), same-node splice, passthrough, metrics and access logs."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from google.protobuf import empty_pb2

from agent import connections as connections_mod
from agent import inbound as inbound_mod
from agent import tunnel as tunnel_mod
from agent.metrics import sample_value
from agent.pool import PoolKey
from agent.state import WorkloadStore
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from tests.integration.proxy_mesh import ECHO_PORT, SERVICE_PORT, SVC_HOST, Agent, Mesh
from tests.support.proxy_echo import connect_from, echo_server, exchange_socket
from tests.support.workloads import pod_workload

MB = 1024 * 1024


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        yield m


def deny_principal(name: str, principal: str) -> apb.Authorization:
    return apb.Authorization(
        name=name,
        namespace="server",
        scope=apb.WORKLOAD_SELECTOR,
        action=apb.DENY,
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(principals=[apb.StringMatch(exact=principal)])])])],
    )


STRICT = apb.Authorization(
    name="istio_converted_static_strict",
    namespace="istio-system",
    scope=apb.WORKLOAD_SELECTOR,
    action=apb.DENY,
    groups=[
        apb.Group(rules=[apb.Rules(matches=[apb.Match(not_principals=[apb.StringMatch(presence=empty_pb2.Empty())])])])
    ],
)


async def send(mesh: Mesh, pod: str, captured: tuple[str, int], size: int) -> Any:
    sock = await connect_from(mesh.ip[pod], captured)
    return await exchange_socket(sock, size)


async def refused(mesh: Mesh, pod: str, captured: tuple[str, int]) -> bool:
    """True when the agent cut the connection without relaying anything."""
    reader, writer = await asyncio.open_connection(sock=await connect_from(mesh.ip[pod], captured))
    try:
        writer.write(b"hello?")
        async with asyncio.timeout(10):
            data = await reader.read()
        return data == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def test_hbone_cross_node_exact_bytes_and_concurrency(mesh: Mesh) -> None:
    to_pod = mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT))
    to_vip = mesh.n1.capture_outbound((mesh.ip["vip"], SERVICE_PORT))
    big = await send(mesh, "client", to_pod, 6 * MB + 7)
    assert big.intact
    results = await asyncio.gather(
        *(send(mesh, "client" if i % 2 else "other", to_vip if i % 3 else to_pod, 150_000 + i) for i in range(40))
    )
    assert all(r.intact for r in results)
    await mesh.settled()
    # both sides reported every connection, with Istio labels
    sel = {"source_workload": "sleep", "destination_workload": "echo", "connection_security_policy": "mutual_tls"}
    out = sample_value(mesh.n1.metrics, "istio_tcp_connections_closed_total", {**sel, "reporter": "source"})
    inn = sample_value(mesh.n2.metrics, "istio_tcp_connections_closed_total", {**sel, "reporter": "destination"})
    assert out == inn == 21
    assert sample_value(
        mesh.n2.metrics,
        "istio_tcp_received_bytes_total",
        {"reporter": "destination", "destination_service": SVC_HOST, "source_principal": str(mesh.identity("other"))},
    ) == sum(150_000 + i for i in range(40) if i % 2 == 0)  # the destination knows the service either way
    # pooled: many streams, few TLS connections
    assert mesh.n1.pool.connection_count() <= 4


async def test_deny_policy_blocks_one_caller_only(mesh: Mesh) -> None:
    mesh.set_policies(
        deny_principal("deny-curl", mesh.identity("other").principal), selector={"echo-1": ["server/deny-curl"]}
    )
    to_pod = mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT))
    assert await refused(mesh, "other", to_pod)
    assert (await send(mesh, "client", to_pod, 100_000)).intact
    await mesh.settled()
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"reason": "policy_denied"}) == 1
    assert sample_value(mesh.n1.metrics, "ambit_connection_errors_total", {"reason": "hbone_401"}) == 1
    assert (
        sample_value(
            mesh.n2.metrics,
            "istio_tcp_connections_closed_total",
            {"response_flags": "DENY", "source_principal": str(mesh.identity("other"))},
        )
        == 1
    )
    # The source reports the peer's 401 as ztunnel does (Error::HttpStatus: CONNECT); DENY is the destination's.
    source = {"reporter": "source", "source_principal": str(mesh.identity("other"))}
    assert (
        sample_value(mesh.n1.metrics, "istio_tcp_connections_failed_total", {**source, "response_flags": "CONNECT"})
        == 1
    )
    assert (
        sample_value(mesh.n1.metrics, "istio_tcp_connections_closed_total", {**source, "response_flags": "DENY"}) == 0
    )


async def test_strict_denies_plaintext_but_not_mtls(mesh: Mesh) -> None:
    plain = mesh.n2.capture_plaintext((mesh.ip["echo-1"], ECHO_PORT))
    assert (await send(mesh, "legacy", plain, 50_000)).intact  # PERMISSIVE: plaintext allowed
    mesh.set_policies(STRICT, selector={"echo-1": ["istio-system/istio_converted_static_strict"]})
    assert await refused(mesh, "legacy", plain)
    assert (await send(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)), 50_000)).intact
    await mesh.settled()
    assert sample_value(mesh.n2.metrics, "ambit_connection_errors_total", {"direction": "inbound_plaintext"}) == 1
    assert (
        sample_value(
            mesh.n2.metrics,
            "istio_tcp_connections_closed_total",
            {
                "connection_security_policy": "unknown",
                "response_flags": "DENY",
                "source_workload": "legacy",
                "source_principal": "unknown",
                "destination_principal": "spiffe://cluster.local/ns/server/sa/echo",
            },
        )
        == 1
    )


async def _open_and_ping(mesh: Mesh, pod: str, captured: tuple[str, int]) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection(sock=await connect_from(mesh.ip[pod], captured))
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    return reader, writer


async def _cut(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(10):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("path", ["hbone", "same_node", "plaintext"])
async def test_policy_change_closes_established_connection(
    mesh: Mesh, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = "echo-2" if path == "same_node" else "echo-1"
    agent = mesh.n1 if path == "same_node" else mesh.n2
    if path == "plaintext":
        captured = mesh.n2.capture_plaintext((mesh.ip["echo-1"], ECHO_PORT))
        doomed, survivor = "legacy", None
    else:
        captured = mesh.n1.capture_outbound((mesh.ip[target], ECHO_PORT))
        doomed, survivor = "other", "client"
    r1, w1 = await _open_and_ping(mesh, doomed, captured)
    kept = await _open_and_ping(mesh, survivor, captured) if survivor else None
    assert len(agent.connections) == (2 if survivor else 1)
    policy = STRICT if path == "plaintext" else deny_principal("deny-curl", mesh.identity("other").principal)
    with caplog.at_level(logging.INFO):
        mesh.set_policies(policy, selector={target: [f"{policy.namespace}/{policy.name}"]})
        assert await _cut(r1)
        w1.close()
        if kept:
            kept[1].write(b"still here")
            assert await kept[0].readexactly(10) == b"still here"
            kept[1].close()
        assert sample_value(agent.metrics, "ambit_connection_errors_total", {"reason": "policy_late_rejection"}) == 1
        await mesh.settled()
    lines = [r for r in caplog.records if r.name == f"access.{agent.node}" and "LateRejection" in str(r.__dict__)]
    assert lines, "the cut connection's access-log line names AuthorizationPolicyLateRejection"
    assert lines[0].fields["policy.name"] == f"{policy.namespace}/{policy.name}"  # type: ignore[attr-defined]
    assert lines[0].fields["bytes_sent"] == 4  # type: ignore[attr-defined]
    assert lines[0].fields["response_flags"] == "DENY"  # type: ignore[attr-defined]


async def test_same_node_splice_exact_bytes_and_reports_both_sides(mesh: Mesh) -> None:
    captured = mesh.n1.capture_outbound((mesh.ip["echo-2"], ECHO_PORT))
    results = await asyncio.gather(
        send(mesh, "client", captured, 8 * MB + 3), *(send(mesh, "other", captured, 64_000 + i) for i in range(10))
    )
    assert all(r.intact for r in results)
    await mesh.settled()
    sel = {"source_workload": "sleep", "destination_workload": "echo", "connection_security_policy": "mutual_tls"}
    for reporter in ("source", "destination"):
        assert sample_value(mesh.n1.metrics, "istio_tcp_received_bytes_total", {**sel, "reporter": reporter}) == (
            8 * MB + 3
        )
    assert sample_value(mesh.n1.metrics, "ambit_hbone_connections_opened_total") == 0
    assert mesh.n1.pool.connection_count() == 0  # no TLS on the same node


async def test_passthrough_and_refusals(mesh: Mesh) -> None:
    to_legacy = mesh.n1.capture_outbound((mesh.ip["legacy"], ECHO_PORT))
    assert (await send(mesh, "client", to_legacy, 300_000)).intact
    await mesh.settled()
    assert (
        sample_value(
            mesh.n1.metrics,
            "istio_tcp_sent_bytes_total",
            {
                "destination_workload": "legacy",
                "connection_security_policy": "unknown",
                "destination_principal": "spiffe://cluster.local/ns/legacy/sa/default",  # known, though not in the mesh
            },
        )
        == 300_000
    )
    # the agent's own ports are never a destination
    assert await refused(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], 15008)))
    # a source that is not a known workload
    assert await refused(mesh, "stranger", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
    errors = {
        (s.labels["reason"]): s.value
        for fam in mesh.n1.metrics.registry.collect()
        for s in fam.samples
        if s.name == "ambit_connection_errors_total"
    }
    assert errors == {"self_call": 1, "unknown_source": 1}


async def test_metrics_and_access_log_over_http(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    port = await mesh.n2.start_metrics()
    with caplog.at_level(logging.INFO):
        assert (await send(mesh, "client", mesh.n1.capture_outbound((mesh.ip["vip"], SERVICE_PORT)), 12345)).intact
        await mesh.settled()
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    line = next(ln for ln in body.splitlines() if ln.startswith("istio_tcp_received_bytes_total{"))
    for label in (
        'reporter="destination"',
        'source_workload="sleep"',
        'source_workload_namespace="client"',
        'source_principal="spiffe://cluster.local/ns/client/sa/sleep"',
        'destination_workload="echo"',
        f'destination_service="{SVC_HOST}"',
        'destination_service_name="echo"',
        'destination_principal="spiffe://cluster.local/ns/server/sa/echo"',
        'request_protocol="tcp"',
        'response_flags="-"',
        'connection_security_policy="mutual_tls"',
    ):
        assert label in line, label
    assert line.endswith(" 12345.0")
    logs = {r.name: r.fields for r in caplog.records if r.name.startswith("access.")}  # type: ignore[attr-defined]
    assert logs["access.n1"]["direction"] == "outbound" and logs["access.n2"]["direction"] == "inbound"
    assert logs["access.n2"]["src.identity"] == str(mesh.identity("client"))
    assert logs["access.n2"]["src.addr"].startswith(mesh.ip["client"] + ":")  # forwarded for= trusted
    # As ztunnel: both sides name the tunnel's address (podIP:15008) as dst.addr and the :authority as hbone_addr.
    for field in ("dst.addr", "dst.hbone_addr"):
        assert logs["access.n2"][field] == logs["access.n1"][field], field
    assert logs["access.n2"]["dst.addr"] != logs["access.n2"]["dst.hbone_addr"]
    assert logs["access.n2"]["bytes_sent"] == 12345 == logs["access.n1"]["bytes_recv"]
    assert logs["access.n1"]["dst.hbone_addr"] == f"{mesh.ip['echo-1']}:{ECHO_PORT}"
    assert logs["access.n2"]["policy.decision"] == "allow"


async def test_outbound_cut_while_the_tunnel_opens_is_closed_and_logged(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbound connection cancelled while its tunnel is being set up (agent shutdown) is still counted as
    closed and gets its access-log line, as ztunnel records a connection whatever ends it."""
    mesh.store.put([pod_workload("hang-1", "server", mesh.ip["stranger"], sa="hang", node="n3")])
    peers: list[asyncio.StreamWriter] = []
    # the pod's HBONE port takes the TCP connection and never answers the TLS handshake
    silent = await asyncio.start_server(lambda _r, w: peers.append(w), mesh.ip["stranger"], 15008)
    client = await connect_from(mesh.ip["client"], mesh.n1.capture_outbound((mesh.ip["stranger"], ECHO_PORT)))
    try:
        for _ in range(500):
            if peers:
                break
            await asyncio.sleep(0.01)
        assert peers, "the agent never dialled the pod's HBONE port"
        assert sample_value(mesh.n1.metrics, "istio_tcp_connections_opened_total") == 1
        with caplog.at_level(logging.INFO):
            await mesh.n1.close()
        closed = {"reporter": "source", "destination_workload": "hang-1"}
        assert sample_value(mesh.n1.metrics, "istio_tcp_connections_closed_total", closed) == 1
        lines = [r.fields for r in caplog.records if r.name == "access.n1"]  # type: ignore[attr-defined]
        assert [line.get("error") for line in lines] == ["cancelled"]
    finally:
        client.close()
        silent.close()
        for w in peers:
            w.close()


async def test_source_of_another_node_is_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    """Only pods of this node are captured into its outbound listener: a client address that the store places
    on another node (stale entry, reused or spoofed IP) is refused, not given that remote pod's identity."""
    captured = mesh.n1.capture_outbound((mesh.ip["echo-2"], ECHO_PORT))
    with caplog.at_level(logging.INFO):
        assert await refused(mesh, "echo-1", captured)  # echo-1 lives on n2
    assert sample_value(mesh.n1.metrics, "ambit_connection_errors_total", {"reason": "source_not_local"}) == 1
    assert sample_value(mesh.n1.metrics, "istio_tcp_connections_opened_total") == 0
    assert (await send(mesh, "client", captured, 10_000)).intact


async def test_a_host_network_pod_is_not_the_source_at_its_nodes_ip(mesh: Mesh) -> None:
    """Plaintext from a node address (kubelet probes, host processes) is not attributed to a host-network pod that
    shares that address (ztunnel never looks host-network pods up by address)."""
    hostnet = pod_workload("node-exporter", "monitoring", mesh.ip["stranger"], node="n2", hbone=False)
    hostnet.network_mode = wpb.HOST_NETWORK
    mesh.store.put([hostnet])
    plain = mesh.n2.capture_plaintext((mesh.ip["echo-1"], ECHO_PORT))
    assert (await send(mesh, "stranger", plain, 1000)).intact
    await mesh.settled()
    opened = {"reporter": "destination", "destination_workload": "echo"}
    assert sample_value(mesh.n2.metrics, "istio_tcp_connections_opened_total", opened) == 1
    assert sample_value(mesh.n2.metrics, "istio_tcp_connections_opened_total", {"source_workload": "unknown"}) == 1


async def test_outbound_internal_error_is_still_closed_and_logged(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure the outbound does not expect (a bug, here injected into the pool) still closes the connection's
    record: opened and closed stay paired and the access log says what happened."""

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(mesh.n1.pool, "open_stream", broken)
    with caplog.at_level(logging.INFO):
        assert await refused(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
        await mesh.settled()
    opened = sample_value(mesh.n1.metrics, "istio_tcp_connections_opened_total")
    assert opened == 1 == sample_value(mesh.n1.metrics, "istio_tcp_connections_closed_total")
    lines = [r.fields for r in caplog.records if r.name == "access.n1"]  # type: ignore[attr-defined]
    assert len(lines) == 1 and "injected" in lines[0]["error"]


async def test_inbound_internal_error_is_still_closed_and_logged(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(inbound_mod, "connect_upstream", broken)
    with caplog.at_level(logging.INFO):
        assert await refused(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
        await mesh.settled()
    sel = {"reporter": "destination"}
    opened = sample_value(mesh.n2.metrics, "istio_tcp_connections_opened_total", sel)
    assert opened == 1 == sample_value(mesh.n2.metrics, "istio_tcp_connections_closed_total", sel)
    lines = [r.fields for r in caplog.records if r.name == "access.n2"]  # type: ignore[attr-defined]
    assert len(lines) == 1 and "injected" in lines[0]["error"]


class _RecordSources:
    """Wraps a module's connect_upstream, recording the source address each upstream connect asked to keep."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
        self.sources: list[str | None] = []
        self._real = module.connect_upstream
        monkeypatch.setattr(module, "connect_upstream", self)

    async def __call__(self, addr: tuple[str, int], *, source_ip: str | None = None, **kw: Any) -> Any:
        self.sources.append(source_ip)
        return await self._real(addr, source_ip=source_ip, **kw)


async def test_same_node_hairpin_connects_from_the_node_address(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod reaching itself (through its own service's VIP) cannot be connected to from its own address: the
    kernel in the pod drops a packet from one of its own addresses arriving on its interface (a martian; the
    connect times out), where ztunnel's in-pod socket goes over the pod's loopback. Other clients keep theirs."""
    rec = _RecordSources(monkeypatch, connections_mod)
    captured = mesh.n1.capture_outbound((mesh.ip["echo-2"], ECHO_PORT))
    assert (await send(mesh, "echo-2", captured, 5000)).intact  # echo-2 (n1) to itself
    assert (await send(mesh, "client", captured, 5000)).intact
    assert rec.sources == [None, mesh.ip["client"]]


async def test_inbound_hairpin_connects_from_the_node_address(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for a pod tunnelled to itself (same-node fast path off): the inbound side connects to it from
    the node's address."""
    rec = _RecordSources(monkeypatch, inbound_mod)
    pod = mesh.ip["echo-1"]
    for client in ("echo-1", "client"):  # echo-1 tunnelled to itself (fast path off), then another pod
        ident = mesh.identity(client)
        stream = await mesh.n1.pool.open_stream(
            PoolKey(ident, mesh.identity("echo-1"), (pod, 15008), source=mesh.ip[client]),  # as the outbound's
            await mesh.certs.client_context(ident),
            f"{pod}:{ECHO_PORT}",
            [("forwarded", f'for="{mesh.ip[client]}:4321"')],
        )
        stream.reset()
    assert rec.sources == [None, mesh.ip["client"]]


async def test_a_service_san_vouches_for_an_endpoint_of_another_identity(mesh: Mesh) -> None:
    """The node of echo-1 runs it as sa echo-vm (its own store says so, and it presents that certificate), while
    the client's node knows it as sa echo: reached through the service whose subject_alt_names names echo-vm,
    the tunnel is accepted (ztunnel's upstream_sans: the workload identity or any service SAN); addressed
    directly, only the workload identity counts and the tunnel is refused."""
    vm = "spiffe://cluster.local/ns/server/sa/echo-vm"
    await mesh.n2.close()
    n2_store = WorkloadStore()
    real = wpb.Workload()
    real.CopyFrom(mesh.workloads["echo-1"])
    real.service_account = "echo-vm"
    n2_store.put([*(w for name, w in mesh.workloads.items() if name != "echo-1"), real])
    mesh.n2 = Agent("n2", n2_store, mesh.certs)
    mesh.n2.serve_hbone(mesh.ip["echo-1"])
    to_vip = mesh.n1.capture_outbound((mesh.ip["vip"], SERVICE_PORT))
    assert await refused(mesh, "client", to_vip)  # the service does not vouch for echo-vm yet
    mesh.service.subject_alt_names.append(vm)
    mesh.store.put([mesh.service])
    assert (await send(mesh, "client", to_vip, 200_000)).intact
    assert await refused(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
    await mesh.settled()
    assert sample_value(mesh.n1.metrics, "ambit_connection_errors_total", {"reason": "hbone_503"}) == 2
    assert [c["peer"] for c in mesh.n1.pool.snapshot()] == [vm]


async def test_the_200_carries_the_destinations_baggage(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ztunnel's inbound (ENABLE_RESPONSE_BAGGAGE, on by default): the 200 answering a CONNECT carries the
    destination pod's `baggage`; a refusal carries none. Read from the responses our client decodes."""
    answers: list[tuple[int, dict[str, str]]] = []
    original = tunnel_mod._ClientProtocol.on_response

    def record(self: Any, ev: Any) -> None:
        answers.append((ev.status, dict(ev.headers)))
        original(self, ev)

    monkeypatch.setattr(tunnel_mod._ClientProtocol, "on_response", record)
    assert (await send(mesh, "client", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)), 1000)).intact
    mesh.set_policies(
        deny_principal("deny-curl", mesh.identity("other").principal), selector={"echo-1": ["server/deny-curl"]}
    )
    assert await refused(mesh, "other", mesh.n1.capture_outbound((mesh.ip["echo-1"], ECHO_PORT)))
    await mesh.settled()
    assert answers == [
        (
            200,
            {
                "baggage": "k8s.cluster.name=Kubernetes,k8s.namespace.name=server,k8s.deployment.name=echo,"
                "service.name=echo,service.version=v1"
            },
        ),
        (401, {}),
    ]


async def test_a_pod_outside_the_mesh_serving_on_an_agent_port_is_reachable(mesh: Mesh) -> None:
    """The agent's ports are refused only on the node's own addresses (ztunnel: on loopback, where its listeners
    are): a pod outside the mesh that really serves on 15001 gets its bytes. This harness's pods all live on the
    host's loopback, which the default check rightly counts as the node's, so the node's address is named here."""
    mesh.servers.append(await echo_server(mesh.ip["legacy"], 15001))
    node = mesh.net + "1"
    mesh.n1.outbound.config = replace(mesh.n1.outbound.config, is_node_address=lambda ip: ip == node)
    assert (await send(mesh, "client", mesh.n1.capture_outbound((mesh.ip["legacy"], 15001)), 100_000)).intact
    assert await refused(mesh, "client", mesh.n1.capture_outbound((node, 15001)))
    await mesh.settled()
    assert sample_value(mesh.n1.metrics, "ambit_connection_errors_total", {"reason": "self_call"}) == 1
    assert (
        sample_value(
            mesh.n1.metrics, "istio_tcp_sent_bytes_total", {"destination_workload": "legacy", "reporter": "source"}
        )
        == 100_000
    )
