"""The agent's readiness against its capture: ready only once capture was reconciled with a whole configuration.

The redirector reports ready as soon as its programs are loaded when nothing has been asked of it yet, so an agent
whose certificates arrived before its first reconcile finished said ready while no enrolled pod was captured.
A stand-in redirector answers like the real one (no kernel needed); the reconcile loop is the agent's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.main import Agent, AgentConfig
from agent.state import ADDRESS_TYPE
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload
from tests.support.xds_controller import wait_for


class _Capture:
    """Ready before any reconcile, as agent.redirect.Redirector is with nothing requested."""

    ready = True
    change_watch = None

    def __init__(self) -> None:
        self.reconciles = 0
        self.fail: Exception | None = None
        self.owners: dict[str, str] = {}
        self.expires: float | None = None  # what hold_expires_in answers after this reconcile
        self.next_expires: float | None = None

    def hold_expires_in(self) -> float | None:
        return self.expires

    def reconcile(self, enrolled: set[str], local: set[str], owners: dict[str, str]) -> dict[str, str]:
        self.reconciles += 1
        self.owners = dict(owners)
        self.expires, self.next_expires = self.next_expires, None
        if self.fail is not None:
            raise self.fail
        return {}

    def status(self) -> dict[str, Any]:
        return {}


@contextlib.asynccontextmanager
async def _agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, _Capture]]:
    agent = Agent(AgentConfig(node="n1", controller="127.0.0.1:1", state_dir=str(tmp_path), capture=False))
    capture = _Capture()
    agent.redirector = capture  # type: ignore[assignment]
    loop = asyncio.create_task(agent._reconcile_loop())
    try:
        yield agent, capture
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await agent.controller.close()


async def test_not_ready_until_capture_was_reconciled_with_the_whole_configuration(tmp_path: Path) -> None:
    async with _agent(tmp_path) as (agent, capture):
        agent._reconcile_wanted.set()  # a first type applied: the config is not whole yet
        await wait_for(lambda: capture.reconciles == 1, what="first reconcile")
        assert agent.readiness() == (False, "waiting for the first full configuration from the controller")
        agent.xds.ready.set()
        assert agent.readiness() == (False, "capture not yet applied to the configuration")
        agent._reconcile_wanted.set()
        await wait_for(lambda: agent.readiness() == (True, "ready"), what="ready after the second reconcile")
        assert capture.reconciles == 2


async def test_the_first_configuration_triggers_a_reconcile_even_when_the_store_did_not_change(tmp_path: Path) -> None:
    """A cluster with no policies: the Authorization type's first response changes nothing in the store, so no
    store change asks for the reconcile that readiness waits for; the configuration becoming whole does."""
    async with _agent(tmp_path) as (agent, capture):
        held = asyncio.create_task(agent._accept_when_configured())
        await asyncio.sleep(0)
        assert capture.reconciles == 0
        agent.xds.ready.set()
        await held
        await wait_for(lambda: agent.readiness() == (True, "ready"), what="a reconcile on the first configuration")
        assert capture.reconciles == 1


async def test_a_failing_reconcile_is_the_reason_readiness_gives(tmp_path: Path) -> None:
    async with _agent(tmp_path) as (agent, capture):
        agent.xds.ready.set()
        capture.fail = OSError("netlink said no")
        agent._reconcile_wanted.set()
        want = (False, "capture not yet applied to the configuration (last attempt: OSError: netlink said no)")
        await wait_for(lambda: agent.readiness() == want, what="the reconcile error in the readiness reason")
        capture.fail = None
        agent._reconcile_wanted.set()
        await wait_for(lambda: agent.readiness() == (True, "ready"), what="ready after a reconcile that worked")


async def test_capture_is_told_which_workload_and_version_holds_each_address(tmp_path: Path) -> None:
    """The reused-address hold (Redirector.reconcile's owners): a token per enrolled address that changes when the
    controller names another workload for it or sends a new version of the same one, and only then."""
    pod = pod_workload("web-1", "default", "10.0.1.5", sa="web", node="n1")
    uid = pod.uid
    async with _agent(tmp_path) as (agent, capture):
        agent.xds.ready.set()
        agent.store.apply(ADDRESS_TYPE, {uid: (wpb.Address(workload=pod), "v1")})
        agent._reconcile_wanted.set()
        await wait_for(lambda: capture.owners == {"10.0.1.5": f"{uid}@v1"}, what="the first token")
        agent.store.apply(ADDRESS_TYPE, {uid: (wpb.Address(workload=pod), "v2")})
        agent._reconcile_wanted.set()
        await wait_for(lambda: capture.owners == {"10.0.1.5": f"{uid}@v2"}, what="a new version's token")
        other = pod_workload("web-2", "default", "10.0.1.5", sa="web", node="n1")
        agent.store.apply(ADDRESS_TYPE, {other.uid: (wpb.Address(workload=other), "v1")}, removed=[uid])
        agent._reconcile_wanted.set()
        await wait_for(lambda: capture.owners == {"10.0.1.5": f"{other.uid}@v1"}, what="the new pod's token")


async def test_a_reconcile_follows_when_a_held_address_is_due_for_release(tmp_path: Path) -> None:
    """A held address is released by a reconcile, and with a static config nothing else would ask for one."""
    async with _agent(tmp_path) as (agent, capture):
        agent.xds.ready.set()
        capture.next_expires = 0.05
        agent._reconcile_wanted.set()
        await wait_for(lambda: capture.reconciles == 2, what="the reconcile the hold's timer asks for")
        await asyncio.sleep(0.3)
        assert capture.reconciles == 2, "no hold left: no more timers"
