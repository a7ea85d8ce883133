"""A big xDS response is applied a chunk per event-loop turn (helper S, agent at large-cluster scale).

The whole state of a 10,000-pod cluster took 0.5-1 s of one loop turn to decode and apply, a 1,000-pod update about
100 ms: no connection was relayed or accepted meanwhile. These tests check that the loop runs between chunks, that
the policies of a response still change together, and that a fresh subscription's stale addresses leave last.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent import xds
from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, StoreChange, WorkloadStore
from agent.xds import Backoff, XdsClient, decode_response
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from controller.monitoring import ControllerMetrics
from controller.xds_server import XdsServer
from tests.support.xds_controller import running, wait_for


def workload(i: int, node: str = "n1", tag: str = "") -> wpb.Address:
    w = wpb.Workload(
        uid=f"c//Pod/demo/w{i}",
        name=f"w{i}",
        namespace="demo",
        node=node,
        addresses=[bytes([10, 0, i // 250, i % 250 + 1])],
        canonical_name=tag,
    )
    return wpb.Address(workload=w)


def policy(i: int, action: int = apb.ALLOW) -> apb.Authorization:
    return apb.Authorization(name=f"p{i}", namespace="demo", scope=apb.NAMESPACE, action=action)  # type: ignore[arg-type]


def resource(name: str, msg: Any, type_url: str, version: str = "v1") -> discovery_pb2.Resource:
    return discovery_pb2.Resource(
        name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=msg.SerializeToString())
    )


class LoopTurns:
    """Counts event-loop turns while it runs, and notes the count at each store change."""

    def __init__(self, store: WorkloadStore) -> None:
        self.turns = 0
        self.changes: list[tuple[int, StoreChange, int, int]] = []  # (turn, change, workloads, policies held)
        self.store = store
        store.subscribe(self._changed)
        self._task = asyncio.get_running_loop().create_task(self._spin())

    def _changed(self, change: StoreChange) -> None:
        held = (len(self.store.all_workloads()), len(self.store.all_policies()))
        self.changes.append((self.turns, change, *held))

    async def _spin(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()


async def test_the_full_state_is_applied_a_chunk_per_loop_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real controller server: 10 workloads and 7 policies, chunks of 3. The workloads arrive in 4 store
    changes with the loop running between them; the policies in one, after every workload; ready comes last."""
    monkeypatch.setattr(xds, "APPLY_CHUNK", 3, raising=False)
    server = XdsServer(metrics=ControllerMetrics())
    server.update(ADDRESS_TYPE, {f"c//Pod/demo/w{i}": workload(i) for i in range(10)})
    server.update(AUTHORIZATION_TYPE, {f"demo/p{i}": policy(i) for i in range(7)})
    port = await server.serve(0)
    store = WorkloadStore()
    turns = LoopTurns(store)
    client = XdsClient(store, f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 0.05))
    try:
        async with running(client):
            await wait_for(client.ready.is_set, what="ready")
    finally:
        turns.stop()
        await server.stop(0)
    address_changes = [(turn, held) for turn, change, held, _ in turns.changes if change.workloads]
    assert [held for _, held in address_changes] == [3, 6, 9, 10]
    seen = [turn for turn, _ in address_changes]
    assert all(later > earlier for earlier, later in itertools.pairwise(seen)), seen
    policy_changes = [(change, held) for _, change, _, held in turns.changes if change.policies]
    assert len(policy_changes) == 1 and policy_changes[0][1] == 7
    assert len(policy_changes[0][0].policies) == 7


async def test_a_fresh_subscription_removes_what_is_gone_after_the_rest_is_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh subscription's first response replaces the state: what it does not name leaves, but only once all it
    brings is in. Removed first, a local pod still there would be missing for a few loop turns, long enough for the
    agent's capture reconcile to release it."""
    monkeypatch.setattr(xds, "APPLY_CHUNK", 2, raising=False)
    store = WorkloadStore()
    store.apply(ADDRESS_TYPE, {f"c//Pod/demo/w{i}": (workload(i), "old") for i in range(6)})
    client = XdsClient(store, "127.0.0.1:1", "n1")
    client._fresh.add(ADDRESS_TYPE)
    kept = [resource(f"c//Pod/demo/w{i}", workload(i, tag="new"), ADDRESS_TYPE, "new") for i in range(4)]
    brought = [resource(f"c//Pod/demo/w{i}", workload(i), ADDRESS_TYPE) for i in range(10, 13)]
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="1", resources=kept + brought)
    held: list[set[str]] = []
    store.subscribe(lambda _change: held.append({w.name for w in store.all_workloads()}))
    ack = await client.receive(resp)
    assert not ack.HasField("error_detail")
    assert held[-1] == {"w0", "w1", "w2", "w3", "w10", "w11", "w12"}
    for names in held[:-1]:
        assert {"w0", "w1", "w2", "w3", "w4", "w5"} <= names, held
    assert len(held) > 2


def test_resources_decoded_together_fall_back_one_by_one_for_a_bad_one() -> None:
    """Addresses are parsed together (one upb arena for a chunk: 2 KB per workload parsed alone, 1 KB together);
    an undecodable one among them is named and the others are kept, as decoded alone."""
    good = [resource(f"c//Pod/demo/w{i}", workload(i), ADDRESS_TYPE) for i in range(3)]
    junk = discovery_pb2.Resource(name="junk", resource=any_pb2.Any(type_url=ADDRESS_TYPE, value=b"\x0a\xff\xff"))
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, resources=[good[0], junk, *good[1:]])
    decoded = decode_response(resp)
    assert [name for name, _ in decoded.errors] == ["junk"]
    assert list(decoded.upserts) == [f"c//Pod/demo/w{i}" for i in range(3)]
    together = decode_response(discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, resources=good))
    for name, (msg, _) in together.upserts.items():
        assert type(msg) is wpb.Address
        assert msg == decoded.upserts[name][0]
        assert msg.workload.uid == name
