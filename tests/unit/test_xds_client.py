"""Agent side of delta xDS without sockets: decoding, NACK text, delta application, state file, backoff; the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.prometheus import Registry
from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, StoreChange, WorkloadStore
from agent.xds import (
    TYPES,
    Backoff,
    StateFileError,
    XdsClient,
    ack_request,
    decode_response,
    decode_state,
    encode_state,
    nack_message,
    resets_backoff,
)
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from tests.support.xds_controller import running, wait_for

IP1, IP2, VIP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), bytes([10, 96, 0, 1])
SVC_KEY = "demo/web.demo.svc.cluster.local"


def wl(
    name: str,
    ip: bytes,
    node: str = "n1",
    services: dict[str, dict[int, int]] | None = None,
    policies: tuple[str, ...] = (),
) -> wpb.Address:
    w = wpb.Workload(uid=f"c//Pod/demo/{name}", name=name, namespace="demo", addresses=[ip], node=node)
    for key, ports in (services or {}).items():
        w.services[key].ports.extend(wpb.Port(service_port=s, target_port=t) for s, t in ports.items())
    w.authorization_policies.extend(policies)
    return wpb.Address(workload=w)


def svc() -> wpb.Address:
    return wpb.Address(
        service=wpb.Service(
            name="web",
            namespace="demo",
            hostname="web.demo.svc.cluster.local",
            addresses=[wpb.NetworkAddress(address=VIP)],
            ports=[wpb.Port(service_port=80, target_port=8080)],
        )
    )


def pol(name: str, ns: str = "demo", scope: int = apb.NAMESPACE) -> apb.Authorization:
    return apb.Authorization(name=name, namespace=ns, scope=scope, action=apb.ALLOW)  # type: ignore[arg-type]


def resource(name: str, msg: object, type_url: str, version: str = "v1") -> discovery_pb2.Resource:
    return discovery_pb2.Resource(
        name=name,
        version=version,
        resource=any_pb2.Any(type_url=type_url, value=msg.SerializeToString()),  # type: ignore[attr-defined]
    )


def response(
    type_url: str, *resources: discovery_pb2.Resource, removed: tuple[str, ...] = (), nonce: str = "1"
) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, nonce=nonce, resources=list(resources), removed_resources=list(removed)
    )


# ---- decoding and NACKs ------------------------------------------------------------------------------------------


def test_bad_resources_are_named_and_good_ones_kept() -> None:
    good = wl("a", IP1)
    bad_ip = wl("b", b"\x01\x02\x03")
    resp = response(
        ADDRESS_TYPE,
        resource("c//Pod/demo/a", good, ADDRESS_TYPE),
        resource("c//Pod/demo/b", bad_ip, ADDRESS_TYPE),
        discovery_pb2.Resource(name="junk", resource=any_pb2.Any(type_url=ADDRESS_TYPE, value=b"\x0a\xff\xff")),
        resource("wrongtype", pol("p"), AUTHORIZATION_TYPE),
        resource("c//Pod/demo/renamed", good, ADDRESS_TYPE),
        removed=("old",),
    )
    decoded = decode_response(resp)
    assert list(decoded.upserts) == ["c//Pod/demo/a"]
    assert decoded.removed == ["old"]
    reasons = dict(decoded.errors)
    assert reasons["c//Pod/demo/b"] == "workload address of 3 bytes is not an IPv4/IPv6 address"
    assert reasons["junk"].startswith("cannot decode")
    assert "in a type.googleapis.com/istio.workload.Address response" in reasons["wrongtype"]
    assert reasons["c//Pod/demo/renamed"].startswith("resource name does not match workload uid")
    ack = ack_request(decoded, "1")
    assert ack.response_nonce == "1" and ack.error_detail.code == 3
    assert ack.error_detail.message == nack_message(decoded.errors)
    assert ack.error_detail.message.startswith("c//Pod/demo/b: workload address of 3 bytes")
    assert ack.error_detail.message.count("; ") == 3


def test_nack_message_format() -> None:
    assert nack_message([("a", "x"), ("b", "y")]) == "a: x; b: y"


def test_clean_response_is_acked() -> None:
    decoded = decode_response(response(AUTHORIZATION_TYPE, resource("demo/p", pol("p"), AUTHORIZATION_TYPE)))
    ack = ack_request(decoded, "7")
    assert not ack.HasField("error_detail") and ack.response_nonce == "7" and ack.type_url == AUTHORIZATION_TYPE


def test_client_applies_deltas_nacks_and_becomes_ready(tmp_path: Path) -> None:
    store = WorkloadStore()
    changes: list[StoreChange] = []
    store.subscribe(changes.append)
    client = XdsClient(store, "127.0.0.1:1", "n1", state_dir=tmp_path)
    ack = client.handle_response(
        response(
            ADDRESS_TYPE,
            resource("c//Pod/demo/a", wl("a", IP1), ADDRESS_TYPE),
            resource("c//Pod/demo/b", wl("b", b"bad"), ADDRESS_TYPE),
        )
    )
    assert ack.error_detail.message.startswith("c//Pod/demo/b:")
    assert store.workload_by_ip("10.0.0.1") is not None and store.versions(ADDRESS_TYPE) == {"c//Pod/demo/a": "v1"}
    assert not client.ready.is_set()
    client.handle_response(response(AUTHORIZATION_TYPE, nonce="2"))
    assert not client.ready.is_set()  # the Address response was NACKed: that type is not synced yet
    client.handle_response(response(ADDRESS_TYPE, removed=("c//Pod/demo/a",), nonce="3"))
    assert client.ready.is_set()
    assert store.workload_by_ip("10.0.0.1") is None and store.versions(ADDRESS_TYPE) == {}
    assert changes[-1].workloads == {"c//Pod/demo/a"}
    assert client.stats["nacks"] == 1 and client.stats["acks"] == 2


def test_initial_requests_resume_from_store_versions() -> None:
    store = WorkloadStore()
    store.apply(ADDRESS_TYPE, {"c//Pod/demo/a": (wl("a", IP1), "abc")})
    client = XdsClient(store, "127.0.0.1:1", "n1", node_ip="10.0.0.9")
    reqs = client.initial_requests()
    assert [r.type_url for r in reqs] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
    assert dict(reqs[0].initial_resource_versions) == {"c//Pod/demo/a": "abc"}
    assert list(reqs[0].resource_names_subscribe) == []  # wildcard
    assert reqs[0].node.id.startswith("ztunnel~10.0.0.9~") and reqs[0].node.metadata["NODE_NAME"] == "n1"
    assert not reqs[1].HasField("node")


# ---- state file --------------------------------------------------------------------------------------------------


def test_state_file_round_trip_restores_store(tmp_path: Path) -> None:
    store = WorkloadStore()
    client = XdsClient(store, "127.0.0.1:1", "n1", state_dir=tmp_path)
    client.handle_response(
        response(
            ADDRESS_TYPE,
            resource("c//Pod/demo/a", wl("a", IP1), ADDRESS_TYPE),
            resource(SVC_KEY, svc(), ADDRESS_TYPE, "s1"),
        )
    )
    client.handle_response(response(AUTHORIZATION_TYPE, resource("demo/p", pol("p"), AUTHORIZATION_TYPE, "p1")))
    data = encode_state(client._good)
    fresh = WorkloadStore()
    again = XdsClient(fresh, "127.0.0.1:1", "n1")
    assert again.restore(data)
    assert again.restored and not again.ready.is_set()
    assert fresh.versions(ADDRESS_TYPE) == {"c//Pod/demo/a": "v1", SVC_KEY: "s1"}
    assert fresh.versions(AUTHORIZATION_TYPE) == {"demo/p": "p1"}
    assert fresh.service_by_vip("10.96.0.1") is not None


def test_corrupt_state_files_are_refused() -> None:
    with pytest.raises(StateFileError):
        decode_state(b"something else")
    good = encode_state({ADDRESS_TYPE: {"x": resource("x", wl("x", IP1), ADDRESS_TYPE).SerializeToString()}})
    with pytest.raises(StateFileError):
        decode_state(good[:-3])
    assert not XdsClient(WorkloadStore(), "127.0.0.1:1", "n1").restore(good[:-3])


def test_state_file_with_a_type_this_agent_does_not_know_restores_the_rest() -> None:
    """A file from another agent version (or a damaged one) used to raise KeyError out of restore(), which run()
    calls first: the xDS client died at every start until someone removed the file."""
    future = "type.googleapis.com/istio.workload.Future"
    data = encode_state(
        {
            future: {"f": resource("f", wl("f", IP1), future).SerializeToString()},
            ADDRESS_TYPE: {"a": resource("c//Pod/demo/a", wl("a", IP1), ADDRESS_TYPE).SerializeToString()},
        }
    )
    store = WorkloadStore()
    client = XdsClient(store, "127.0.0.1:1", "n1")
    assert client.restore(data)
    assert store.versions(ADDRESS_TYPE) == {"c//Pod/demo/a": "v1"}
    assert set(client._good) == set(TYPES)  # nothing of the unknown type is written back


# ---- backoff -----------------------------------------------------------------------------------------------------


def test_backoff_doubles_to_cap_and_resets() -> None:
    b = Backoff(jitter=0)  # jitter: tests/unit/test_review_xds_backoff.py
    delays = [b.next_delay() for _ in range(15)]
    assert delays[:4] == [0.01, 0.02, 0.04, 0.08]
    assert delays[-1] == 15.0 and max(delays) == 15.0
    b.reset()
    assert b.next_delay() == 0.01


@pytest.mark.parametrize(
    ("code", "details", "resets"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Connection refused", False),
        (grpc.StatusCode.UNAVAILABLE, "transport is closing", True),
        (grpc.StatusCode.INTERNAL, "received prior goaway: code: NO_ERROR", True),
        (grpc.StatusCode.UNKNOWN, "", True),
        (grpc.StatusCode.CANCELLED, "", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", True),
        (grpc.StatusCode.UNAUTHENTICATED, "bad token", False),
    ],
)
def test_backoff_reset_rules(code: grpc.StatusCode, details: str, resets: bool) -> None:
    err = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string="")
    assert resets_backoff(err) is resets


def test_clean_end_of_stream_resets_backoff() -> None:
    assert resets_backoff(None)


# ---- the store ---------------------------------------------------------------------------------------------------


def test_store_indexes_and_queries() -> None:
    store = WorkloadStore()
    store.apply(
        ADDRESS_TYPE,
        {
            "c//Pod/demo/a": (wl("a", IP1, services={SVC_KEY: {80: 8080}}, policies=("demo/sel",)), "1"),
            "c//Pod/demo/b": (wl("b", IP2, node="n2", services={SVC_KEY: {}}), "1"),
            SVC_KEY: (svc(), "1"),
        },
    )
    store.apply(
        AUTHORIZATION_TYPE,
        {
            "demo/ns": (pol("ns"), "1"),
            "istio-system/global": (pol("global", "istio-system", apb.GLOBAL), "1"),
            "demo/sel": (pol("sel", scope=apb.WORKLOAD_SELECTOR), "1"),
            "demo/other-sel": (pol("other-sel", scope=apb.WORKLOAD_SELECTOR), "1"),
            "other/ns": (pol("ns", "other"), "1"),
        },
    )
    a = store.workload_by_ip("10.0.0.1")
    assert a is not None and a.name == "a" and store.workload_by_uid("c//Pod/demo/a") == a
    assert store.workload_by_ip("10.9.9.9") is None and store.workload_by_ip("not an ip") is None
    service = store.service_by_vip("10.96.0.1")
    assert service is not None and store.service_by_key(SVC_KEY) == service
    assert sorted((w.name, t) for w, t in store.endpoints(service, 80)) == [("a", 8080), ("b", 0)]
    assert [w.name for w in store.local_workloads("n2")] == ["b"]
    assert sorted(p.name for p in store.policies_for(a)) == ["global", "ns", "sel"]
    assert len(store.all_policies()) == 5
    dump = store.snapshot_dict()
    assert dump["workloads"][0]["addresses"] == ["10.0.0.1"]
    assert dump["services"][0]["addresses"][0]["address"] == "10.96.0.1"
    # Moving a workload to a new IP updates every index; removing the service clears the VIP.
    change = store.apply(ADDRESS_TYPE, {"c//Pod/demo/a": (wl("a", bytes([10, 0, 0, 3])), "2")}, removed=[SVC_KEY])
    assert change.workloads == {"c//Pod/demo/a"} and SVC_KEY in change.services
    assert store.workload_by_ip("10.0.0.1") is None and store.workload_by_ip("10.0.0.3") is not None
    assert store.service_by_vip("10.96.0.1") is None
    assert [w.name for w, _ in store.endpoints(SVC_KEY)] == ["b"]
    store.apply(AUTHORIZATION_TYPE, {}, removed=["demo/ns"])
    moved = store.workload_by_uid("c//Pod/demo/a")
    assert moved is not None and sorted(p.name for p in store.policies_for(moved)) == ["global"]


def test_store_put_accepts_bare_messages() -> None:
    store = WorkloadStore()
    store.put([wl("a", IP1).workload, svc().service], [pol("p")])
    assert store.workload_by_ip("10.0.0.1") is not None
    assert store.service_by_key(SVC_KEY) is not None
    assert [p.name for p in store.all_policies()] == ["p"]


async def test_unreadable_credentials_back_off_and_are_counted(tmp_path: Path) -> None:
    registry = Registry()
    client = XdsClient(
        WorkloadStore(),
        "127.0.0.1:1",
        "n1",
        root_cert=tmp_path / "missing.pem",
        backoff=Backoff(0.01, 0.04),
        registry=registry,
    )
    async with running(client):
        await asyncio.sleep(0.3)
    assert client.backoff.current == 0.04  # grew to the cap: a local failure never resets it
    assert "missing.pem" in client.stats["last_error"]
    attempts = registry.get_sample_value("istio_xds_connection_terminations_total", {"reason": "Error"})
    assert attempts is not None and 3 <= attempts < 20


async def test_unexpected_session_error_is_retried_not_fatal(tmp_path: Path) -> None:
    """Anything but RpcError/OSError (here a token file that is not UTF-8) used to end run(): the agent kept
    running with no config updates, and nothing was logged since the task's exception was never retrieved."""
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe")
    registry = Registry()
    client = XdsClient(
        WorkloadStore(), "127.0.0.1:1", "n1", token_file=token, backoff=Backoff(0.01, 0.04), registry=registry
    )
    async with running(client):
        await wait_for(
            lambda: (
                (registry.get_sample_value("istio_xds_connection_terminations_total", {"reason": "Error"}) or 0) >= 3
            ),
            what="repeated attempts",
        )
    assert client.stats["last_error"].startswith("UnicodeDecodeError")
    assert client.backoff.current == 0.04  # a local failure never resets the backoff


def test_messages_are_counted() -> None:
    registry = Registry()
    client = XdsClient(WorkloadStore(), "127.0.0.1:1", "n1", registry=registry)
    resp = response(AUTHORIZATION_TYPE, resource("demo/p", pol("p"), AUTHORIZATION_TYPE))
    client.handle_response(resp)
    assert registry.get_sample_value("istio_xds_message_total", {"url": AUTHORIZATION_TYPE}) == 1
    assert registry.get_sample_value("istio_xds_message_bytes_total", {"url": AUTHORIZATION_TYPE}) == resp.ByteSize()


def test_a_failing_store_subscriber_does_not_stop_the_others_or_the_update(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store holds the change whatever a subscriber does: an exception escaping apply() made the xDS client
    drop the stream before recording the response, and a reconnect never sent it again."""
    store = WorkloadStore()
    seen: list[StoreChange] = []

    def broken(change: StoreChange) -> None:
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    store.subscribe(seen.append)
    change = store.apply(ADDRESS_TYPE, {"w1": (wl("w1", IP1), "v1")})
    assert change and seen == [change], "the later subscriber still ran and apply() returned"
    assert store.workload_by_ip("10.0.0.1") is not None
    assert store.versions(ADDRESS_TYPE) == {"w1": "v1"}
    assert any("subscriber failed" in r.getMessage() for r in caplog.records)
