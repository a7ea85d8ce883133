"""The agent's last good xDS state on disk (<state-dir>/xds-state.pb), which a restart with the controller away
serves from: it must hold what the store enforces, including an update that arrived just before the agent stopped
and the version of a resource that the store applied when a later copy in the same response was rejected."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, WorkloadStore
from agent.xds import STATE_FILE, Backoff, XdsClient
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from tests.support.xds_controller import free_port, wait_for


def deny(name: str, action: int = apb.DENY) -> apb.Authorization:
    return apb.Authorization(name=name, namespace="demo", scope=apb.NAMESPACE, action=action, groups=[apb.Group()])  # type: ignore[arg-type]


def response(*policies: tuple[apb.Authorization, str], nonce: str = "1") -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=AUTHORIZATION_TYPE, nonce=nonce)
    for p, version in policies:
        resp.resources.add(
            name=f"demo/{p.name}",
            version=version,
            resource=any_pb2.Any(type_url=AUTHORIZATION_TYPE, value=p.SerializeToString()),
        )
    return resp


def address_response() -> discovery_pb2.DeltaDiscoveryResponse:
    w = wpb.Workload(uid="c//Pod/demo/server", name="server", namespace="demo", addresses=[bytes([10, 0, 0, 1])])
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="a1")
    resp.resources.add(
        name=w.uid,
        version="v1",
        resource=any_pb2.Any(type_url=ADDRESS_TYPE, value=wpb.Address(workload=w).SerializeToString()),
    )
    return resp


def restored(state_dir: Path) -> dict[str, int]:
    """What an agent restarted with the controller away would enforce: policy key -> action."""
    store = WorkloadStore()
    XdsClient(store, "127.0.0.1:1", "n1", state_dir=state_dir).restore()
    return {f"{p.namespace}/{p.name}": p.action for p in store.all_policies()}


@contextlib.asynccontextmanager
async def stopped_at_the_end(client: XdsClient) -> AsyncIterator[None]:
    """``client.run()`` for the block with the controller away (its first retry 30 s off), cancelled at the end
    as the agent's shutdown does."""
    task = asyncio.create_task(client.run())
    try:
        await wait_for(lambda: client.stats["last_error"], what="the controller found away")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_update_just_before_the_agent_stops_is_on_disk(tmp_path: Path) -> None:
    client = XdsClient(
        WorkloadStore(), f"127.0.0.1:{free_port()}", "n1", state_dir=tmp_path, backoff=Backoff(30.0, 30.0, jitter=0)
    )
    async with stopped_at_the_end(client):
        client.handle_response(address_response())
        client.handle_response(response((deny("first"), "v1")))
        await wait_for(lambda: (tmp_path / STATE_FILE).exists() and restored(tmp_path), what="the first save")
        client.handle_response(response((deny("second"), "v1"), nonce="2"))  # a DENY added just before SIGTERM
    assert restored(tmp_path) == {"demo/first": apb.DENY, "demo/second": apb.DENY}


async def test_a_rejected_later_copy_does_not_replace_the_applied_one_on_disk(tmp_path: Path) -> None:
    store = WorkloadStore()
    client = XdsClient(
        store, f"127.0.0.1:{free_port()}", "n1", state_dir=tmp_path, backoff=Backoff(30.0, 30.0, jitter=0)
    )
    async with stopped_at_the_end(client):
        client.handle_response(address_response())
        client.handle_response(response(nonce="p0"))  # the first policies: none
        ack = client.handle_response(response((deny("p"), "v1"), (deny("p", action=7), "v2")))
        assert "demo/p: action 7" in ack.error_detail.message
        assert [p.action for p in store.all_policies()] == [apb.DENY]  # the valid copy is enforced
        await wait_for(lambda: (tmp_path / STATE_FILE).exists(), what="a save")
    assert restored(tmp_path) == {"demo/p": apb.DENY}


async def test_a_first_sync_cut_short_is_no_configuration_to_restart_from(tmp_path: Path) -> None:
    """The workloads arrived, their policies not yet (or rejected): the agent is not ready, as ztunnel is not
    before both types are ACKed. Restarted from such a file with the controller away, it served every workload
    with no policy at all: DENYs and ALLOWs unenforced."""
    client = XdsClient(
        WorkloadStore(), f"127.0.0.1:{free_port()}", "n1", state_dir=tmp_path, backoff=Backoff(30.0, 30.0, jitter=0)
    )
    async with stopped_at_the_end(client):
        client.handle_response(address_response())
        bad = deny("p", action=7)
        client.handle_response(response((bad, "v1"), nonce="p1"))  # the only policy, rejected: still not ready
        assert not client.ready.is_set()
    restarted = XdsClient(WorkloadStore(), "127.0.0.1:1", "n1", state_dir=tmp_path)
    restarted.restore()
    assert not restarted.has_config


async def test_the_state_is_saved_once_both_types_are_in(tmp_path: Path) -> None:
    client = XdsClient(
        WorkloadStore(), f"127.0.0.1:{free_port()}", "n1", state_dir=tmp_path, backoff=Backoff(30.0, 30.0, jitter=0)
    )
    async with stopped_at_the_end(client):
        client.handle_response(address_response())
        client.handle_response(response((deny("p"), "v1"), nonce="p1"))
        assert client.ready.is_set()
        await wait_for(lambda: restored(tmp_path), what="the save")
    store = WorkloadStore()
    restarted = XdsClient(store, "127.0.0.1:1", "n1", state_dir=tmp_path)
    restarted.restore()
    assert restarted.has_config
    assert store.workload_by_ip("10.0.0.1") is not None
    assert [p.name for p in store.all_policies()] == ["p"]


async def test_an_agent_restored_from_disk_keeps_saving_while_a_type_stays_rejected(tmp_path: Path) -> None:
    """Restored from a whole state, the store stays whole (a rejected update keeps the previous version): updates
    that apply must reach the file even while one type's first response after the restart is NACKed (which keeps
    `ready` unset for good), or a later restart with the controller away went back to a state long gone."""
    first = XdsClient(
        WorkloadStore(), f"127.0.0.1:{free_port()}", "n1", state_dir=tmp_path, backoff=Backoff(30.0, 30.0, jitter=0)
    )
    async with stopped_at_the_end(first):
        first.handle_response(address_response())
        first.handle_response(response((deny("old"), "v1"), nonce="p1"))
        await wait_for(lambda: restored(tmp_path), what="the first save")
    second = XdsClient(
        WorkloadStore(), f"127.0.0.1:{free_port()}", "n1", state_dir=tmp_path, backoff=Backoff(30.0, 30.0, jitter=0)
    )
    async with stopped_at_the_end(second):
        assert second.restored
        broken = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="a2")
        broken.resources.add(name="x", version="v9", resource=any_pb2.Any(type_url=ADDRESS_TYPE, value=b"\xff"))
        second.handle_response(broken)  # NACKed: Address never syncs, the agent is not ready
        second.handle_response(response((deny("new"), "v1"), nonce="p2"))
        assert not second.ready.is_set()
        await wait_for(lambda: "demo/new" in restored(tmp_path), what="the save of the new policy")
    assert restored(tmp_path) == {"demo/old": apb.DENY, "demo/new": apb.DENY}
