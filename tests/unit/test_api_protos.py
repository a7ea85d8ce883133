"""The generated proto modules are current, and our messages use Istio's field numbers on the wire.

The wire checks do not trust the generated descriptors: a tiny independent protobuf decoder walks the encoded
bytes, and the expected field numbers and wire types below are written out by hand from Istio's tables
(shared/reference/istio-ambient.md sections 2.1, 2.2, 3.1).
"""

from __future__ import annotations

import importlib
import ipaddress
import re
from pathlib import Path

import pytest
from google.protobuf import empty_pb2, struct_pb2, wrappers_pb2

from api import build
from api.istio.security import authorization_pb2 as authz
from api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from api.istio.workload import workload_pb2 as wl

VARINT, I64, LEN, I32 = 0, 1, 2, 5


_GENERATOR_VERSIONS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (
        re.compile(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"
        ),
        "ValidateProtobufRuntimeVersion(X,",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = 'X'"),
)


def _without_generator_versions(text: str) -> str:
    """Generated text minus the generator's own version stamps, so a newer grpcio-tools does not read as stale."""
    for pattern, replacement in _GENERATOR_VERSIONS:
        text = pattern.sub(replacement, text)
    return text


def test_checked_in_modules_are_current(tmp_path: Path) -> None:
    generated = build.generate(tmp_path)
    assert len(generated) == 7
    for path in generated:
        rel = path.relative_to(tmp_path)
        checked_in = build.REPO_ROOT / rel
        assert checked_in.exists(), f"{rel} is missing; run `make proto`"
        fresh = _without_generator_versions(path.read_text())
        assert _without_generator_versions(checked_in.read_text()) == fresh, f"{rel} is stale; run `make proto`"


def test_version_stamps_are_the_only_thing_ignored() -> None:
    text = (build.REPO_ROOT / "api/istio/v1/auth/ca_pb2.py").read_text()
    normalised = _without_generator_versions(text)
    assert "Protobuf Python Version: X" in normalised and "ValidateProtobufRuntimeVersion(X," in normalised
    assert _without_generator_versions(text.replace("_serialized_end=", "_serialized_end=1")) != normalised


def test_generated_modules_import_alongside_xds_protos() -> None:
    # Import the envoy modules the xDS server and client use, and ours, into one descriptor pool.
    for name in (
        "envoy.service.discovery.v3.discovery_pb2",
        "envoy.service.discovery.v3.ads_pb2_grpc",
        "envoy.config.core.v3.base_pb2",
        "google.rpc.status_pb2",
    ):
        importlib.import_module(name)
    assert wl.DESCRIPTOR.package == "istio.workload"
    assert authz.DESCRIPTOR.package == "istio.security"
    assert ca_pb2.DESCRIPTOR.package == "istio.v1.auth"
    assert hasattr(ca_pb2_grpc, "IstioCertificateServiceStub")
    assert hasattr(ca_pb2_grpc, "add_IstioCertificateServiceServicer_to_server")


def test_type_urls_and_service_name() -> None:
    from google.protobuf import any_pb2

    packed = any_pb2.Any()
    packed.Pack(wl.Address(workload=wl.Workload(uid="x")))
    assert packed.type_url == "type.googleapis.com/istio.workload.Address"
    packed.Pack(authz.Authorization(name="p"))
    assert packed.type_url == "type.googleapis.com/istio.security.Authorization"
    service = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    assert [m.name for m in service.methods] == ["CreateCertificate"]


# --- an independent wire decoder -------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """Decode one message level into (field number, wire type, value) in wire order."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _varint(buf, pos)
        elif wire_type == LEN:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type == I64:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire_type == I32:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        out.append((number, wire_type, value))
    assert pos == len(buf)
    return out


def one(buf: bytes, number: int, wire_type: int) -> int | bytes:
    hits = [(t, v) for n, t, v in fields(buf) if n == number]
    assert len(hits) == 1, f"field {number}: {len(hits)} occurrences in {fields(buf)}"
    assert hits[0][0] == wire_type, f"field {number}: wire type {hits[0][0]}, want {wire_type}"
    return hits[0][1]


def many(buf: bytes, number: int, wire_type: int) -> list[int | bytes]:
    hits = [(t, v) for n, t, v in fields(buf) if n == number]
    assert all(t == wire_type for t, _ in hits), f"field {number}: wire types {hits}"
    return [v for _, v in hits]


def packed_varints(buf: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        out.append(value)
    return out


def sub(value: int | bytes) -> bytes:
    assert isinstance(value, bytes)
    return value


def test_workload_wire_numbers() -> None:
    ip = ipaddress.ip_address("10.1.2.3").packed
    workload = wl.Workload(
        uid="Kubernetes//Pod/demo/web-0",
        name="web-0",
        namespace="demo",
        addresses=[ip],
        hostname="h",
        network="net",
        tunnel_protocol=wl.HBONE,
        trust_domain="td.example",
        service_account="web",
        node="node-a",
        canonical_name="web",
        canonical_revision="v1",
        workload_type=wl.POD,
        workload_name="web",
        native_tunnel=True,
        authorization_policies=["demo/p"],
        status=wl.UNHEALTHY,
        cluster_id="Kubernetes",
        network_mode=wl.HOST_NETWORK,
        capacity=wrappers_pb2.UInt32Value(value=7),
        locality=wl.Locality(region="r", zone="z", subzone="s"),
        application_tunnel=wl.ApplicationTunnel(protocol=wl.ApplicationTunnel.PROXY, port=15088),
        waypoint=wl.GatewayAddress(
            address=wl.NetworkAddress(network="net", address=ip, length=32), hbone_mtls_port=15008
        ),
        network_gateway=wl.GatewayAddress(hostname=wl.NamespacedHostname(namespace="gw", hostname="eg")),
        extensions=[wl.Extension(name="e")],
    )
    workload.services["demo/web.demo.svc.cluster.local"].ports.add(
        service_port=80, target_port=8080, app_protocol=wl.HTTP2
    )
    address = wl.Address(workload=workload).SerializeToString()

    body = sub(one(address, 1, LEN))  # Address.workload = 1
    assert one(body, 20, LEN) == b"Kubernetes//Pod/demo/web-0"
    assert one(body, 1, LEN) == b"web-0"
    assert one(body, 2, LEN) == b"demo"
    assert many(body, 3, LEN) == [ip]
    assert one(body, 21, LEN) == b"h"
    assert one(body, 4, LEN) == b"net"
    assert one(body, 5, VARINT) == 1  # HBONE
    assert one(body, 6, LEN) == b"td.example"
    assert one(body, 7, LEN) == b"web"
    assert one(body, 9, LEN) == b"node-a"
    assert one(body, 10, LEN) == b"web"
    assert one(body, 11, LEN) == b"v1"
    assert one(body, 12, VARINT) == 2  # POD
    assert one(body, 13, LEN) == b"web"
    assert one(body, 14, VARINT) == 1
    assert one(body, 16, LEN) == b"demo/p"
    assert one(body, 17, VARINT) == 1  # UNHEALTHY
    assert one(body, 18, LEN) == b"Kubernetes"
    assert one(body, 25, VARINT) == 1  # HOST_NETWORK
    assert one(sub(one(body, 27, LEN)), 1, VARINT) == 7
    locality = sub(one(body, 24, LEN))
    assert (one(locality, 1, LEN), one(locality, 2, LEN), one(locality, 3, LEN)) == (b"r", b"z", b"s")
    tunnel = sub(one(body, 23, LEN))
    assert (one(tunnel, 1, VARINT), one(tunnel, 2, VARINT)) == (1, 15088)
    waypoint = sub(one(body, 8, LEN))
    assert one(waypoint, 3, VARINT) == 15008
    net_addr = sub(one(waypoint, 2, LEN))
    assert (one(net_addr, 1, LEN), one(net_addr, 2, LEN), one(net_addr, 3, VARINT)) == (b"net", ip, 32)
    gateway = sub(one(body, 19, LEN))
    hostname = sub(one(gateway, 1, LEN))
    assert (one(hostname, 1, LEN), one(hostname, 2, LEN)) == (b"gw", b"eg")
    assert one(sub(one(body, 26, LEN)), 1, LEN) == b"e"
    # services is map<string, PortList> = 22: entries are {key=1, value=2}.
    entry = sub(one(body, 22, LEN))
    assert one(entry, 1, LEN) == b"demo/web.demo.svc.cluster.local"
    port = sub(one(sub(one(entry, 2, LEN)), 1, LEN))
    assert (one(port, 1, VARINT), one(port, 2, VARINT), one(port, 3, VARINT)) == (80, 8080, 2)
    assert not [n for n, _, _ in fields(body) if n == 15]  # reserved


def test_service_wire_numbers() -> None:
    vip = ipaddress.ip_address("fd00::1").packed
    service = wl.Service(
        name="web",
        namespace="demo",
        hostname="web.demo.svc.cluster.local",
        addresses=[wl.NetworkAddress(network="", address=vip)],
        ports=[wl.Port(service_port=80, target_port=8080)],
        subject_alt_names=["san"],
        load_balancing=wl.LoadBalancing(
            routing_preference=[wl.LoadBalancing.NODE, wl.LoadBalancing.NETWORK],
            mode=wl.LoadBalancing.FAILOVER,
            health_policy=wl.LoadBalancing.ALLOW_ALL,
        ),
        ip_families=wl.IPV6_ONLY,
        canonical=True,
        ingress_use_waypoint=True,
        weighted_waypoints=[wl.WeightedWaypoint(weight=3)],
        visibility=wl.Service.NAMESPACE,
    )
    body = sub(one(wl.Address(service=service).SerializeToString(), 2, LEN))  # Address.service = 2
    assert one(body, 1, LEN) == b"web"
    assert one(body, 2, LEN) == b"demo"
    assert one(body, 3, LEN) == b"web.demo.svc.cluster.local"
    assert one(sub(one(body, 4, LEN)), 2, LEN) == vip
    port = sub(one(body, 5, LEN))
    assert (one(port, 1, VARINT), one(port, 2, VARINT)) == (80, 8080)
    assert one(body, 6, LEN) == b"san"
    lb = sub(one(body, 8, LEN))
    assert packed_varints(sub(one(lb, 1, LEN))) == [4, 6]
    assert (one(lb, 2, VARINT), one(lb, 3, VARINT)) == (2, 1)
    assert one(body, 9, VARINT) == 2
    assert one(body, 11, VARINT) == 1
    assert one(body, 12, VARINT) == 1
    assert one(sub(one(body, 13, LEN)), 2, VARINT) == 3
    assert one(body, 14, VARINT) == 1


def test_authorization_wire_numbers() -> None:
    cidr = ipaddress.ip_address("10.0.0.0").packed
    policy = authz.Authorization(
        name="deny-x",
        namespace="demo",
        scope=authz.WORKLOAD_SELECTOR,
        action=authz.DENY,
        dry_run=True,
        groups=[
            authz.Group(
                rules=[
                    authz.Rules(
                        matches=[
                            authz.Match(
                                namespaces=[authz.StringMatch(exact="a")],
                                not_namespaces=[authz.StringMatch(prefix="b")],
                                principals=[authz.StringMatch(suffix="/sa/c")],
                                not_principals=[authz.StringMatch(presence=empty_pb2.Empty())],
                                source_ips=[authz.Address(address=cidr, length=8)],
                                not_source_ips=[authz.Address(address=cidr, length=16)],
                                destination_ips=[authz.Address(address=cidr, length=24)],
                                not_destination_ips=[authz.Address(address=cidr, length=32)],
                                destination_ports=[8080, 9090],
                                not_destination_ports=[22],
                                service_accounts=[authz.ServiceAccountMatch(namespace="n", serviceAccount="s")],
                                not_service_accounts=[authz.ServiceAccountMatch(namespace="m")],
                            )
                        ]
                    )
                ]
            )
        ],
    )
    body = policy.SerializeToString()
    assert one(body, 1, LEN) == b"deny-x"
    assert one(body, 2, LEN) == b"demo"
    assert one(body, 3, VARINT) == 2  # WORKLOAD_SELECTOR
    assert one(body, 4, VARINT) == 1  # DENY
    assert one(body, 6, VARINT) == 1
    rules = sub(one(sub(one(body, 5, LEN)), 1, LEN))  # groups = 5, Group.rules = 1
    match = sub(one(rules, 2, LEN))  # Rules.matches = 2
    assert one(sub(one(match, 1, LEN)), 1, LEN) == b"a"  # StringMatch.exact = 1
    assert one(sub(one(match, 2, LEN)), 2, LEN) == b"b"  # prefix = 2
    assert one(sub(one(match, 3, LEN)), 3, LEN) == b"/sa/c"  # suffix = 3
    assert one(sub(one(match, 4, LEN)), 4, LEN) == b""  # presence = 4 (empty message)
    for number, length in ((5, 8), (6, 16), (7, 24), (8, 32)):
        address = sub(one(match, number, LEN))
        assert (one(address, 1, LEN), one(address, 2, VARINT)) == (cidr, length)
    assert packed_varints(sub(one(match, 9, LEN))) == [8080, 9090]
    assert packed_varints(sub(one(match, 10, LEN))) == [22]
    sa = sub(one(match, 11, LEN))
    assert (one(sa, 1, LEN), one(sa, 2, LEN)) == (b"n", b"s")
    assert one(sub(one(match, 12, LEN)), 1, LEN) == b"m"


def test_allow_and_global_are_zero_values() -> None:
    # proto3 omits zero enums: an ALLOW/GLOBAL policy carries neither field, exactly as istiod encodes it.
    body = authz.Authorization(name="a", scope=authz.GLOBAL, action=authz.ALLOW).SerializeToString()
    assert [n for n, _, _ in fields(body)] == [1]
    assert (authz.NAMESPACE, wl.NONE, wl.LEGACY_ISTIO_MTLS, wl.TLS) == (1, 0, 2, 5)


def test_ca_wire_numbers() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/demo/sa/web"})
    request = ca_pb2.IstioCertificateRequest(csr="PEM", validity_duration=86400, metadata=metadata)
    body = request.SerializeToString()
    assert one(body, 1, LEN) == b"PEM"
    assert one(body, 3, VARINT) == 86400
    entry = sub(one(sub(one(body, 4, LEN)), 1, LEN))  # Struct.fields map entry
    assert one(entry, 1, LEN) == b"ImpersonatedIdentity"
    assert one(sub(one(entry, 2, LEN)), 3, LEN) == b"spiffe://cluster.local/ns/demo/sa/web"  # Value.string_value
    response = ca_pb2.IstioCertificateResponse(cert_chain=["leaf", "root"]).SerializeToString()
    assert many(response, 1, LEN) == [b"leaf", b"root"]


@pytest.mark.parametrize(
    ("raw", "number", "value"),
    [
        # Bytes written by hand: Workload{uid(20)="u", tunnel_protocol(5)=HBONE, service_account(7)="sa"}.
        (bytes([0xA2, 0x01, 0x01]) + b"u" + bytes([0x28, 0x01, 0x3A, 0x02]) + b"sa", "uid", "u"),
        (bytes([0x28, 0x01]), "tunnel_protocol", wl.HBONE),
        (bytes([0x3A, 0x02]) + b"sa", "service_account", "sa"),
    ],
)
def test_hand_encoded_workload_decodes(raw: bytes, number: str, value: object) -> None:
    assert getattr(wl.Workload.FromString(raw), number) == value
