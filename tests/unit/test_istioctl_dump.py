"""The agent's /config_dump as `istioctl ztunnel-config workloads|services|policies|certificates|all` reads it.

istioctl port-forwards to the node proxy's 15000, GETs /config_dump and decodes it with Go's encoding/json into the
structs of istio/istio istioctl/pkg/writer/ztunnel/configdump/api.go (at 86c9f01f: ZtunnelWorkload lines 29-52,
GatewayAddress 59-61, LoadBalancer 63-67, ZtunnelEndpoint 69-74, CIDRVIP 76-104, ZtunnelService 106-120,
PolicyMatch 122-135, StringMatch 137-142, ServiceAccountMatch 144-147, ZtunnelPolicy 149-155, ZtunnelDump 157-163,
CertsDump/Cert 165-177, WorkloadState and its connections 179-209), through configdump.go's rawDump and Prime (lines
45-94), then prints what workload.go (72-149), services.go (45-89), policies.go (45-63), certificates.go (50-89) and
connections.go (85-154) read. tests/support/istioctl_decode.py emulates that decoding (a wrong JSON type, an
out-of-range port, a map key that is no uint16 fail it, as they fail istioctl) and those tables.

The values are ztunnel's (istio/ztunnel at 62d82653: src/state/workload.rs Workload, GatewayAddress, InboundProtocol
and HealthStatus spelled as their Rust variants; src/state/service.rs Service and Endpoint, endpoints keyed by workload
uid and filtered by should_include_endpoint; src/rbac.rs Authorization and RbacMatch; src/state.rs
ProxyStateSerialization's `stagedServices`; src/inpod/admin.rs's `workloadState`). The dump is built from a real
WorkloadStore and served by the real admin server. Before this shape the dump was the workload API's protos as JSON
(`addresses`, `tunnelProtocol` HBONE/NONE, `status` HEALTHY, `groups`): istioctl failed at the first service with
ports (`ports` a list where it decodes a map: "error unmarshalling config dump response from ztunnel"), and without
services it found no IPs, no protocol, no VIPs, no endpoints and no rules, which these tests catch field by field.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2, wrappers_pb2

from agent import rbac
from agent.admin import ConfigDump, admin_server, config_dump
from agent.config_dump import workload_state, ztunnel_dump
from agent.connections import TrackedConnection
from agent.identity import CertificateManager
from agent.outbound import OutboundConnection
from agent.prometheus import Registry
from agent.state import WorkloadStore
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from tests.support import istioctl_decode as istioctl
from tests.support.workloads import pod_workload
from tests.unit.test_identity_manager import FakeSigner

TD = "example.org"  # the agent's --trust-domain: the workloads name none
SERVER_SVC = "demo/server.demo.svc.cluster.local"
WAYPOINT_SVC = "demo/waypoint.demo.svc.cluster.local"


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ports(*pairs: tuple[int, int]) -> wpb.PortList:
    return wpb.PortList(ports=[wpb.Port(service_port=s, target_port=t) for s, t in pairs])


def net(text: str) -> apb.Address:
    n = ipaddress.ip_network(text)
    return apb.Address(address=n.network_address.packed, length=n.prefixlen)


def build_store() -> WorkloadStore:
    """A waypoint and its service, a client behind it (by address), a service behind the waypoint (by hostname) with
    a healthy and an unhealthy endpoint, a workload outside the mesh (TCP) of a service not held (staged), and three
    policies: selector ALLOW with every kind of match and a malformed entry, namespace DENY, global dry-run."""
    store = WorkloadStore()
    waypoint_gw = wpb.GatewayAddress(address=wpb.NetworkAddress(address=ip("10.96.0.20")), hbone_mtls_port=15008)
    by_host = wpb.GatewayAddress(
        hostname=wpb.NamespacedHostname(namespace="demo", hostname="waypoint.demo.svc.cluster.local"),
        hbone_mtls_port=15008,
    )
    store.put(
        [
            wpb.Service(
                name="waypoint",
                namespace="demo",
                hostname="waypoint.demo.svc.cluster.local",
                addresses=[wpb.NetworkAddress(address=ip("10.96.0.20"))],
                ports=[wpb.Port(service_port=15008, target_port=15008)],
            ),
            wpb.Service(
                name="server",
                namespace="demo",
                hostname="server.demo.svc.cluster.local",
                addresses=[
                    wpb.NetworkAddress(address=ip("10.96.0.10")),
                    wpb.NetworkAddress(address=ip("10.97.0.0"), length=16),
                ],
                ports=[wpb.Port(service_port=80, target_port=8080), wpb.Port(service_port=9000)],
                subject_alt_names=["spiffe://example.org/ns/demo/sa/server"],
                waypoint=by_host,
                load_balancing=wpb.LoadBalancing(
                    routing_preference=[wpb.LoadBalancing.NODE, wpb.LoadBalancing.ZONE],
                    mode=wpb.LoadBalancing.STRICT,
                ),
                ip_families=wpb.IPV4_ONLY,
            ),
            pod_workload(
                "waypoint-0",
                "demo",
                "10.244.1.20",
                sa="waypoint",
                node="node1",
                services={WAYPOINT_SVC: ports((15008, 15008))},
            ),
            pod_workload(
                "client",
                "demo",
                "10.244.1.10",
                sa="client",
                node="node1",
                deployment="client",
                waypoint=waypoint_gw,
                locality=wpb.Locality(region="eu", zone="eu-1"),
                workload_type=wpb.POD,
            ),
            pod_workload(
                "server-1", "demo", "10.244.2.11", sa="server", node="node2", services={SERVER_SVC: ports((80, 8080))}
            ),
            pod_workload(
                "server-2",
                "demo",
                "10.244.2.12",
                sa="server",
                node="node2",
                services={SERVER_SVC: ports((80, 8080))},
                status=wpb.UNHEALTHY,
            ),
            pod_workload(
                "web",
                "legacy",
                "10.244.2.20",
                node="node2",
                hbone=False,
                services={"legacy/web.legacy.svc.cluster.local": ports((80, 8000))},
                capacity=wrappers_pb2.UInt32Value(value=3),
            ),
        ],
        [
            apb.Authorization(
                name="server-allow",
                namespace="demo",
                scope=apb.WORKLOAD_SELECTOR,
                action=apb.ALLOW,
                groups=[
                    apb.Group(
                        rules=[
                            apb.Rules(
                                matches=[
                                    apb.Match(
                                        namespaces=[apb.StringMatch(exact="demo")],
                                        principals=[apb.StringMatch(suffix="/sa/client")],
                                        not_principals=[apb.StringMatch(prefix="example.org/ns/evil/")],
                                        service_accounts=[
                                            apb.ServiceAccountMatch(namespace="demo", serviceAccount="c")
                                        ],
                                        source_ips=[net("10.244.0.0/16"), apb.Address(address=b"\x0a\x00\x00")],
                                        destination_ports=[8080, 70000],
                                    )
                                ]
                            ),
                            apb.Rules(matches=[apb.Match(not_destination_ips=[net("10.244.2.12/32")])]),
                        ]
                    )
                ],
            ),
            apb.Authorization(
                name="deny-anonymous",
                namespace="legacy",
                scope=apb.NAMESPACE,
                action=apb.DENY,
                groups=[
                    apb.Group(
                        rules=[
                            apb.Rules(matches=[apb.Match(not_principals=[apb.StringMatch(presence=empty_pb2.Empty())])])
                        ]
                    )
                ],
            ),
            apb.Authorization(name="audit", namespace="istio-system", scope=apb.GLOBAL, dry_run=True),
        ],
    )
    return store


class NoCerts:
    def snapshot(self) -> list[Any]:
        return []


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(resp.read())


async def served_dump(store: WorkloadStore, certs: Any = None, *sections: Any) -> dict[str, Any]:
    """GET /config_dump from the agent's admin server, as istioctl does through its port-forward."""
    certs = NoCerts() if certs is None else certs
    dump = config_dump(store, certs, *sections, trust_domain=TD)
    admin = admin_server(dump, certs.snapshot, lambda: None, store, trust_domain=TD)
    await admin.start("127.0.0.1", 0)
    try:
        result: dict[str, Any] = await asyncio.to_thread(_get, f"http://127.0.0.1:{admin.port}/config_dump")
        return result
    finally:
        await admin.close()


@pytest.fixture
async def dumped() -> dict[str, Any]:
    return await served_dump(build_store(), None, ("connections", lambda: [{"connection": "x"}]), ("config", dict))


def by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in entries}


def test_istioctl_decodes_the_dump_and_ambits_sections_stay_beside(dumped: dict[str, Any]) -> None:
    """configdump.go Prime (lines 54-79) succeeds: every field it decodes has its Go type. Ambit's sections are under
    keys rawDump (lines 45-51) does not name, even without regard to case."""
    z = istioctl.prime(dumped)
    assert len(z["workloads"]) == 5 and len(z["services"]) == 2 and len(z["policies"]) == 3
    assert z["certificates"] == [] and z["workloadState"] == {}
    assert dumped["connections"] == [{"connection": "x"}] and dumped["config"] == {}
    istioctl_keys = {"services", "workloads", "policies", "certificates", "workloadstate"}
    assert {k for k in dumped if k.lower() in istioctl_keys} == {"services", "workloads", "policies", "certificates"}


def test_workloads_in_ztunnels_shape(dumped: dict[str, Any]) -> None:
    """api.go ZtunnelWorkload (lines 29-52): `workloadIps`, `protocol` HBONE or TCP (ztunnel's InboundProtocol),
    `status` Healthy (HealthStatus), `waypoint.destination` as ztunnel's NetworkAddress text `network/ip`, identity
    fields filled in as ztunnel fills them (trust domain: the agent's), `capacity` a uint32 defaulting to 1."""
    z = istioctl.prime(dumped)
    w = by_name(z["workloads"])
    client = w["client"]
    assert client["uid"] == "Kubernetes//Pod/demo/client"
    assert client["workloadIps"] == ["10.244.1.10"]
    assert client["protocol"] == "HBONE" and w["web"]["protocol"] == "TCP"
    assert client["status"] == "Healthy" and w["server-2"]["status"] == "Unhealthy"
    assert client["waypoint"] == {"destination": "/10.96.0.20"} and w["server-1"]["waypoint"] is None
    assert (client["namespace"], client["node"], client["serviceAccount"], client["trustDomain"]) == (
        "demo",
        "node1",
        "client",
        TD,
    )
    assert w["web"]["serviceAccount"] == "default"
    assert (client["workloadName"], client["canonicalName"], client["canonicalRevision"]) == ("client", "client", "v1")
    assert (client["workloadType"], w["web"]["workloadType"]) == ("pod", "deployment")
    assert client["clusterId"] == "Kubernetes" and w["web"]["clusterId"] == "Kubernetes"
    assert client["locality"] == {"region": "eu", "zone": "eu-1", "subzone": ""}
    assert (client["capacity"], w["web"]["capacity"]) == (1, 3)
    # ztunnel's own fields istioctl does not decode
    raw = by_name(dumped["workloads"])
    assert raw["client"]["waypoint"] == {"destination": "/10.96.0.20", "hboneMtlsPort": 15008}
    assert raw["client"]["networkMode"] == "Standard"
    assert raw["server-1"]["services"] == [SERVER_SVC]
    assert "services" not in raw["client"] and "locality" not in raw["web"]


def test_the_workloads_table(dumped: dict[str, Any]) -> None:
    """workload.go PrintWorkloadSummary (lines 72-108): the WAYPOINT column finds the waypoint's service by VIP
    (waypointName, lines 132-149), None without one."""
    assert istioctl.workload_rows(istioctl.prime(dumped)) == [
        ["demo", "client", "10.244.1.10", "node1", "waypoint", "HBONE"],
        ["demo", "server-1", "10.244.2.11", "node2", "None", "HBONE"],
        ["demo", "server-2", "10.244.2.12", "node2", "None", "HBONE"],
        ["demo", "waypoint-0", "10.244.1.20", "node1", "None", "HBONE"],
        ["legacy", "web", "10.244.2.20", "node2", "None", "TCP"],
    ]


def test_services_in_ztunnels_shape(dumped: dict[str, Any]) -> None:
    """api.go ZtunnelService (lines 106-120) and ZtunnelEndpoint (69-74): `vips` `network/ip`, `cidrVips`, `ports`
    map[string]int, `endpoints` keyed by workload uid with `port` map[uint16]uint16; the unhealthy endpoint left out
    as ztunnel's should_include_endpoint leaves it; `waypoint.destination` `namespace/hostname`."""
    z = istioctl.prime(dumped)
    server = by_name(z["services"])["server"]
    assert (server["namespace"], server["hostname"]) == ("demo", "server.demo.svc.cluster.local")
    assert server["vips"] == ["/10.96.0.10"]
    assert server["cidrVips"] == [{"cidr": "10.97.0.0/16", "network": ""}]
    assert server["ports"] == {"80": 8080, "9000": 0}
    uid = "Kubernetes//Pod/demo/server-1"
    assert server["endpoints"] == {uid: {"workloadUid": uid, "service": "", "address": "", "port": {80: 8080}}}
    assert server["waypoint"] == {"destination": WAYPOINT_SVC}
    assert server["loadBalancer"] == {
        "mode": "Strict",
        "routingPreferences": ["Node", "Zone"],
        "healthPolicy": "OnlyHealthy",
    }
    assert server["subjectAltNames"] == ["spiffe://example.org/ns/demo/sa/server"]
    assert (server["ipFamilies"], server["canonical"], server["visibility"]) == ("IPv4", False, "Public")
    raw = by_name(dumped["services"])["server"]
    assert raw["endpoints"][uid]["status"] == "Healthy"
    assert "ipFamilies" not in by_name(dumped["services"])["waypoint"]  # AUTOMATIC: ztunnel's None, skipped
    # a workload of a service the agent does not hold: ztunnel's staged endpoints
    web = "Kubernetes//Pod/legacy/web"
    assert dumped["stagedServices"] == {
        "legacy/web.legacy.svc.cluster.local": {web: {"workloadUid": web, "port": {"80": 8000}, "status": "Healthy"}}
    }


def test_the_services_table(dumped: dict[str, Any]) -> None:
    """services.go PrintServiceSummary (lines 45-89): VIP without its network, waypoint by `namespace/hostname`,
    healthy/all endpoints."""
    assert istioctl.service_rows(istioctl.prime(dumped)) == [
        ["demo", "server", "10.96.0.10", "waypoint", "1/1"],
        ["demo", "waypoint", "10.96.0.20", "None", "1/1"],
    ]


async def test_allow_all_keeps_unhealthy_endpoints() -> None:
    """ztunnel's should_include_endpoint: any health under the ALLOW_ALL health policy, which istioctl counts apart."""
    store = build_store()
    held = store.service_by_key(SERVER_SVC)
    assert held is not None
    svc = wpb.Service()
    svc.CopyFrom(held)
    svc.load_balancing.health_policy = wpb.LoadBalancing.ALLOW_ALL
    store.put([svc])
    z = istioctl.prime(await served_dump(store))
    assert istioctl.service_rows(z)[0] == ["demo", "server", "10.96.0.10", "waypoint", "1/2"]
    assert by_name(z["services"])["server"]["loadBalancer"]["healthPolicy"] == "AllowAll"


def test_policies_in_ztunnels_shape(dumped: dict[str, Any]) -> None:
    """api.go ZtunnelPolicy (lines 149-155), PolicyMatch (122-135), StringMatch (137-142): `scope` and `action` as
    ztunnel's RbacScope/RbacAction variants, `rules` [group][clause][match], StringMatch externally tagged, IPs
    `ip/length`, ports uint16. The 3-byte address and port 70000 (which ztunnel drops or wraps) are left out of the
    rules and named in `malformedEntries`."""
    z = istioctl.prime(dumped)
    p = by_name(z["policies"])
    allow = p["server-allow"]
    assert (allow["namespace"], allow["scope"], allow["action"]) == ("demo", "WorkloadSelector", "Allow")
    [[[first], [second]]] = allow["rules"]
    assert {k: v for k, v in first.items() if v} == {
        "namespaces": [{"Exact": "demo", "Suffix": "", "Prefix": "", "Presence": None}],
        "principals": [{"Exact": "", "Suffix": "/sa/client", "Prefix": "", "Presence": None}],
        "notPrincipals": [{"Exact": "", "Suffix": "", "Prefix": "example.org/ns/evil/", "Presence": None}],
        "serviceAccounts": [{"namespace": "demo", "serviceAccount": "c"}],
        "sourceIps": ["10.244.0.0/16"],
        "destinationPorts": [8080],
    }
    assert {k: v for k, v in second.items() if v} == {"notDestinationIps": ["10.244.2.12/32"]}
    deny = p["deny-anonymous"]
    assert (deny["scope"], deny["action"]) == ("Namespace", "Deny")
    assert deny["rules"][0][0][0]["notPrincipals"][0]["Presence"] == []
    assert (p["audit"]["scope"], p["audit"]["rules"]) == ("Global", [])
    raw = by_name(dumped["policies"])
    assert raw["server-allow"]["rules"][0][0][0]["namespaces"] == [{"Exact": "demo"}]  # ztunnel's enum, alone
    assert raw["audit"]["dryRun"] is True and raw["server-allow"]["dryRun"] is False
    where, kept = "groups[0].rules[0].matches[0]", "dropped (the field's other values still apply)"
    assert raw["server-allow"]["malformedEntries"] == [
        f"{where}.source_ips[1] (address of 3 bytes): {kept}",
        f"{where}.destination_ports[1] (70000): {kept}",
    ]
    assert "malformedEntries" not in raw["audit"]
    assert istioctl.policy_rows(z) == [
        ["demo", "server-allow", "Allow", "WorkloadSelector"],
        ["istio-system", "audit", "Allow", "Global"],
        ["legacy", "deny-anonymous", "Deny", "Namespace"],
    ]


async def test_the_certificates_table(tmp_path: Path) -> None:
    """certificates.go PrintSecretSummary (lines 50-89) over CertsDump/Cert (api.go 165-177): a leaf row and a root
    row (rootCerts), the serial printed in hex from the decimal the dump holds."""
    ca = CertificateAuthority(tmp_path / "ca", TD)
    certs = CertificateManager(FakeSigner(ca), TD, registry=Registry())
    web = Identity(TD, "demo", "client")
    try:
        await certs.server_context(web)
        z = istioctl.prime(await served_dump(build_store(), certs))
        held = certs.certificate(web)
    finally:
        await certs.close()
    rows = istioctl.secret_rows(z)
    assert [(r[0], r[1], r[2]) for r in rows] == [(str(web), "Leaf", "Available"), (str(web), "Root", "Available")]
    assert held is not None and rows[0][3] == f"{held.serial:x}"


def test_workload_state_for_the_connections_table() -> None:
    """api.go WorkloadState (lines 179-209) and connections.go PrintConnectionsSummary (85-154): per captured local
    workload `state` Up, `info`, its tracked (inbound) connections, HBONE with a peer identity, else TCP, and the
    connections the agent carries for it (outbound); another workload's are not shown under it."""
    store = build_store()
    client_id = Identity(TD, "demo", "client")
    server_1 = "Kubernetes//Pod/demo/server-1"
    tracked = [
        TrackedConnection(
            rbac.Connection("10.244.1.10", "10.244.2.11", 8080, client_id, 40000), server_1, "inbound", print
        ),
        TrackedConnection(rbac.Connection("10.0.0.9", "10.244.2.11", 8080, None, 41000), server_1, "inbound", print),
    ]
    carried = [  # server-1 calling out: a pod outside the mesh (passthrough), and the client pod through HBONE
        OutboundConnection(server_1, ("10.244.2.11", 43000), ("10.9.9.9", 443), ("10.9.9.9", 443), "TCP"),
        OutboundConnection(server_1, ("10.244.2.11", 42000), ("10.244.1.10", 9000), ("10.244.1.10", 15008), "HBONE"),
        OutboundConnection("Kubernetes//Pod/demo/gone", ("10.244.2.99", 1), ("10.9.9.9", 1), ("10.9.9.9", 1), "TCP"),
    ]
    state = workload_state(store, "node2", {"10.244.2.11", "10.244.1.10"}, tracked, carried)
    assert list(state) == ["Kubernetes//Pod/demo/server-1"]  # node2's, captured: not server-2 nor node1's client
    z = istioctl.prime({"workloadState": state, **ztunnel_dump(store, TD)})
    [server] = z["workloadState"].values()
    assert (server["state"], server["info"]) == (
        "Up",
        {"name": "server-1", "namespace": "demo", "trustDomain": "", "serviceAccount": "server"},
    )
    assert istioctl.connection_rows(z) == [
        ["server-1.demo", "Inbound", "server-1.demo:8080", "10.0.0.9:41000", "", "TCP"],
        ["server-1.demo", "Inbound", "server-1.demo:8080", "client.demo:40000", "", "HBONE"],
        ["server-1.demo", "Outbound", "server-1.demo:42000", "client.demo:15008", "client.demo:9000", "HBONE"],
        ["server-1.demo", "Outbound", "server-1.demo:43000", "10.9.9.9:443", "10.9.9.9:443", "TCP"],
    ]


def test_the_decoder_is_as_strict_as_go() -> None:
    """The emulation fails where encoding/json fails, so the tests above would see a wrong type."""
    good = {"workloads": [{"name": "a", "protocol": "HBONE"}]}
    assert istioctl.prime(good)["workloads"][0]["protocol"] == "HBONE"
    for bad in (
        {"workloads": [{"protocol": 1}]},
        {"workloads": [{"capacity": -1}]},
        {"workloads": [{"waypoint": "/10.0.0.1"}]},
        {"services": [{"endpoints": {"u": {"port": {"http": 80}}}}]},
        {"services": [{"endpoints": {"u": {"port": {"80": 70000}}}}]},
        {"policies": [{"rules": [[[{"destinationPorts": [70000]}]]]}]},
        {"workloads": [{"name": "a", "Name": "b"}]},
    ):
        with pytest.raises(istioctl.GoDecodeError):
            istioctl.prime(bad)


def test_a_section_istioctl_would_decode_is_refused() -> None:
    """Go matches keys without regard to case: a section `Workloads` would be read as istioctl's `workloads`."""
    with pytest.raises(ValueError, match="Workloads"):
        ConfigDump(WorkloadStore(), NoCerts(), [("Workloads", list)])
    ConfigDump(WorkloadStore(), NoCerts(), [("workloadState", dict), ("pool", list)])
