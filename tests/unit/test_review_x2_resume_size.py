"""The reconnect request that lists every held resource's version must not break at realistic mesh sizes.

An agent resuming sends ``initial_resource_versions`` with the name and version of everything it holds: about 70
bytes a resource with pod names, 357 with Kubernetes' longest names. The controller took 16 MiB (reached near
230,000 resources); it now takes 64 MiB, above Kubernetes' documented 150,000 pods at 357 bytes each (51 MiB).
istiod takes 4 MiB by default (ISTIO_GPRC_MAXRECVMSGSIZE, pilot/pkg/features/tuning.go), and ztunnel, which always
sends its versions (src/xds/client.rs run_internal), then reconnects in a loop (Istio 1.31 upgrade notes). Our
agent, refused with "larger than max (N vs. LIMIT)" before any response, subscribes afresh (no versions) where the
request would exceed LIMIT, and takes the first response of that type as the whole state, dropping what it does
not name. Over real gRPC on 127.0.0.1 (in-process).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, WorkloadStore
from agent.xds import STATE_FILE, Backoff, XdsClient, decode_state
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from controller import xds_server
from controller.monitoring import ControllerMetrics
from controller.xds_server import XdsServer
from tests.support.xds_controller import free_port, running, wait_for

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def workload(i: int, tag: str = "") -> wpb.Address:
    w = wpb.Workload(uid=f"c//Pod/demo/w{i}", name=f"w{i}", namespace="demo", canonical_name=tag)
    w.addresses.append(socket.inet_aton(f"10.0.{i // 250}.{i % 250 + 1}"))
    return wpb.Address(workload=w)


def resource(name: str, msg: Any, type_url: str, version: str) -> discovery_pb2.Resource:
    return discovery_pb2.Resource(
        name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=msg.SerializeToString())
    )


async def test_the_controller_takes_the_resume_request_of_a_kubernetes_sized_mesh() -> None:
    """75,000 resources with Kubernetes' longest names: 25.5 MB, over the 16 MiB the controller took."""
    server = XdsServer(metrics=ControllerMetrics())
    port = await server.serve(0)
    namespace = "n" * 63
    held = {f"Kubernetes//Pod/{namespace}/" + f"{i:06d}".rjust(253, "p"): f"{i:016x}" for i in range(75_000)}
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, initial_resource_versions=held)
    assert request.ByteSize() > 16 * 1024 * 1024
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            call = channel.stream_stream(
                ADS,
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )()  # type: ignore[call-arg]
            await call.write(request)
            response = await asyncio.wait_for(call.read(), 60)
            call.cancel()
    finally:
        await server.stop(0)
    assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    # The controller holds none of them: it says so, which it can only do having read the request.
    assert len(response.removed_resources) == len(held)


async def test_the_agent_subscribes_afresh_when_the_controller_refuses_its_resume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A controller with an 8 KiB receive limit (istiod's 4 MiB, scaled down): the agent holds 1,000 workloads (a
    24 KB resume request) of which the controller still has 3, one of them changed."""
    limit = 8 * 1024
    options = [(k, limit if k == "grpc.max_receive_message_length" else v) for k, v in xds_server.GRPC_SERVER_OPTIONS]
    monkeypatch.setattr(xds_server, "GRPC_SERVER_OPTIONS", options)
    server = XdsServer(metrics=ControllerMetrics())
    server.update(ADDRESS_TYPE, {"c//Pod/demo/w1": workload(1, "v2"), "c//Pod/demo/w2": workload(2)})
    server.update(ADDRESS_TYPE, {"c//Pod/demo/w1000": workload(1000)})
    port = await server.serve(free_port())
    store = WorkloadStore()
    store.apply(ADDRESS_TYPE, {f"c//Pod/demo/w{i}": (workload(i), "old") for i in range(1, 1001)})
    client = XdsClient(store, f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 0.05), state_dir=tmp_path)
    try:
        async with running(client):
            await wait_for(client.ready.is_set, what="ready after a fresh subscription")
            assert {w.name: w.canonical_name for w in store.all_workloads()} == {"w1": "v2", "w2": "", "w1000": ""}
            assert client.resume_limit == limit
            assert "RESOURCE_EXHAUSTED" in client.stats["last_error"]

            def saved() -> set[str]:
                path = tmp_path / STATE_FILE
                if not path.exists():
                    return set()
                return {r.name for resp in decode_state(path.read_bytes()) for r in resp.resources}

            await wait_for(lambda: saved() == {"c//Pod/demo/w1", "c//Pod/demo/w2", "c//Pod/demo/w1000"}, what="file")
    finally:
        await server.stop(0)


class Refusal:
    def __init__(self, code: grpc.StatusCode, details: str, unusable_response: bool = False) -> None:
        self._code, self._details, self.unusable_response = code, details, unusable_response

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def holding(n: int) -> XdsClient:
    store = WorkloadStore()
    store.apply(ADDRESS_TYPE, {f"c//Pod/demo/w{i}": (workload(i), "old") for i in range(1, n + 1)})
    policy = apb.Authorization(name="p", namespace="demo")
    store.apply(AUTHORIZATION_TYPE, {"demo/p": (policy, "pv")})
    return XdsClient(store, "127.0.0.1:1", "n1")


@pytest.mark.parametrize(
    ("refusal", "limit"),
    [
        (Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (24000 vs. 8192)"), 8192),
        (Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc: received message larger than max (24000 vs. 4194304)"),
         None),  # istiod's limit, which our request fits: not what was refused
        (Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "request rate limit exceeded: context canceled"), None),  # istiod
        (Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "message of 300000000 bytes exceeds 209715200", True), None),
        (Refusal(grpc.StatusCode.UNAVAILABLE, "larger than max (24000 vs. 8192)"), None),
    ],
    ids=["grpc-core", "limit above the request", "istiod rate limit", "the agent's own limit", "other code"],
)  # fmt: skip
def test_only_a_refusal_of_the_resume_request_sets_the_limit(refusal: Refusal, limit: int | None) -> None:
    client = holding(1000)
    client.initial_requests()
    client._note_refused_resume(refusal)
    assert client.resume_limit == limit


def test_over_the_limit_a_type_is_subscribed_afresh_and_its_first_response_replaces_the_state() -> None:
    client = holding(1000)
    client.resume_limit = 8192
    address, authorization = client.initial_requests()
    assert not address.initial_resource_versions and address.HasField("node")
    assert dict(authorization.initial_resource_versions) == {"demo/p": "pv"}  # small: resumed as before
    bad = wpb.Address(workload=wpb.Workload(uid="c//Pod/demo/w7", addresses=[b"\x01"]))
    ack = client.handle_response(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=ADDRESS_TYPE,
            nonce="1",
            resources=[
                resource("c//Pod/demo/w1", workload(1, "v2"), ADDRESS_TYPE, "new"),
                resource("c//Pod/demo/w7", bad, ADDRESS_TYPE, "bad"),  # NACKed: named, so w7 is kept as it was
            ],
        )
    )
    assert ack.error_detail.message.startswith("c//Pod/demo/w7: ")
    assert client.store.versions(ADDRESS_TYPE) == {"c//Pod/demo/w1": "new", "c//Pod/demo/w7": "old"}
    # Later responses are deltas again.
    client.handle_response(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=ADDRESS_TYPE, nonce="2", resources=[resource("c//Pod/demo/w2", workload(2), ADDRESS_TYPE, "n")]
        )
    )
    assert set(client.store.versions(ADDRESS_TYPE)) == {"c//Pod/demo/w1", "c//Pod/demo/w2", "c//Pod/demo/w7"}
