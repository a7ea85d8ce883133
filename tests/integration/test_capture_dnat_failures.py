"""DNAT capture's edges (agent/capture_dnat.py) with the real kernel program and nftables, in the compact topology of
tests/support/redirect_topology.py: a kube-proxy-like DNAT in the node netns sends a VIP to pod pa (enrolled), a
transparent probe listener stands in for the agent, connections come from the remote node behind the uplink (the tc
program there sees the VIP, not an enrolled pod, and lets them pass: only the table decides).

Covered: the pod's port 15008 goes to the HBONE listener; fail-open lets a SYN with no listener pass to the pod and is
switched at run time; a table nft cannot write is a capture failure that holds readiness (not under fail-open) until
a later reconcile writes it; an agent started with DNAT capture off removes the table a previous one left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from agent.capture_dnat import table_name
from agent.redirect import DNAT_FAILURE, RedirectConfig, Redirector
from tests.support import redirect_topology as rt
from tests.support.mesh import table_held_elsewhere

VIP = "10.96.8.1"  # no interface has it: the DNAT rule below sends it to pa
ALL_PORTS = ("--port", "15001", "--port", "15006", "--port", "15008")


class Env(rt.RedirectorEnv):
    @property
    def table(self) -> str:
        return table_name(self.topo.prefix)

    def no_listener_verdicts(self) -> list[str]:
        """What the table does with an enrolled pod's DNATed SYN no listener took (IPv4, IPv6)."""
        chain = self.nft("list", "chain", "inet", self.table, "prerouting")
        return [line.split()[-1] for line in chain.splitlines() if "@enrolled" in line and " counter " in line]

    def enroll(self) -> dict[str, str]:
        return self.r.reconcile({self.pa.ip}, {p.ip for p in self.topo.pods.values()})


@pytest.fixture(scope="module")
def env(require_root: None) -> Iterator[Env]:
    topo = rt.up(("pa",))
    config = RedirectConfig(instance=topo.prefix, uplinks=(topo.uplink,))
    e = Env(topo, config, Redirector(config))
    try:
        with rt.enter(topo.node):
            e.r.start()
        topo.probe_server(e.pa.netns, "serve", "--port", "8080", "--port", "15008")
        e.listen(*ALL_PORTS)
        rules = (
            "table ip test_dnat {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n"
            f"  ip daddr {VIP} tcp dport {{ 8080, 15008 }} dnat to {e.pa.ip}\n }}\n}}\n"
        )
        e.nft("-f", "-", script=rules)
        assert e.enroll() == {}
        yield e
    finally:
        rt.take_down(topo, e.r, config)


def test_a_dnated_connection_to_the_pods_hbone_port_goes_to_the_hbone_listener(env: Env) -> None:
    """Before, every DNATed connection went to the plaintext listener, which relayed the client's TLS to pa:15008
    (nothing of the agent's there): HBONE through a Service or an east-west gateway failed."""
    got = rt.connect(env.topo.remote, VIP, 15008)
    assert got.startswith(f"tproxy:15008 orig={env.pa.ip}:15008 peer={env.topo.remote_ip}:"), got
    assert rt.connect(env.topo.remote, VIP, 8080).startswith(f"tproxy:15006 orig={env.pa.ip}:8080"), "other ports"
    env.listen("--port", "15001", "--port", "15006")  # the HBONE listener alone is missing
    try:
        with pytest.raises(OSError):  # dropped, never handed to the plaintext listener
            rt.connect(env.topo.remote, VIP, 15008, timeout=1.2)
    finally:
        env.listen(*ALL_PORTS)


def test_fail_open_lets_a_dnated_syn_with_no_listener_through_to_the_pod_and_is_switched_at_run_time(
    env: Env,
) -> None:
    env.listen()
    try:
        with pytest.raises(OSError):  # the default: fail closed
            rt.connect(env.topo.remote, VIP, 8080, timeout=1.2)
        env.r.set_fail_open(True)
        got = rt.connect(env.topo.remote, VIP, 8080)
        assert got.startswith(f"server:8080 local={env.pa.ip}:8080 peer={env.topo.remote_ip}:"), got
        env.listen(*ALL_PORTS)
        assert rt.connect(env.topo.remote, VIP, 8080).startswith("tproxy:15006 "), "a listener still captures"
        assert env.r.status()["fail_open"] is True and env.no_listener_verdicts() == ["accept", "accept"]
    finally:
        env.r.set_fail_open(False)
        env.listen(*ALL_PORTS)
    assert env.no_listener_verdicts() == ["drop", "drop"], "fail closed again"


@pytest.fixture
def table_held(env: Env) -> Iterator[None]:
    """Someone else's table of the agent's name that the kernel refuses to let anyone else change (nft's ``owner``
    flag: it belongs to the netlink socket of the process that made it, and goes when that process does)."""
    with table_held_elsewhere(env.topo.node, env.table):
        yield


def test_a_table_nft_cannot_write_holds_readiness_until_a_reconcile_writes_it(env: Env, table_held: None) -> None:
    failures = env.enroll()
    assert env.table in failures.get(DNAT_FAILURE, ""), failures
    assert env.r.ready is False and DNAT_FAILURE in env.r.status()["failures"]
    env.r.set_fail_open(True)  # debugging: reported, does not hold readiness
    try:
        assert DNAT_FAILURE in env.r.status()["failures"] and env.r.ready is True
    finally:
        env.r.set_fail_open(False)
    assert env.r.ready is False


def test_after_the_failure_a_reconcile_writes_the_table_and_readiness_returns(env: Env) -> None:
    """Runs after the table_held test (its holder gone, the kernel removed the held table with it)."""
    assert env.enroll() == {}
    assert env.r.ready is True and DNAT_FAILURE not in env.r.status()["failures"]
    assert env.pa.ip in env.nft("list", "table", "inet", env.table)
    assert rt.connect(env.topo.remote, VIP, 8080).startswith("tproxy:15006 ")


def test_an_agent_started_with_dnat_capture_off_removes_the_table_a_previous_one_left(env: Env) -> None:
    """Last: it ends the module's agent. Left behind, the table would go on capturing the addresses it last held
    (an agent turned off for a node whose kernel refuses it ends up there after a rollout, too)."""
    assert env.table in env.nft("list", "tables")
    env.r.close()  # the previous agent exits; its table stays, as its filters do
    env.r = Redirector(dataclasses.replace(env.config, capture_dnat=False))
    with rt.enter(env.topo.node):
        env.r.start()
    assert env.table not in env.nft("list", "tables")
    assert env.enroll() == {} and env.r.ready is True
    assert env.table not in env.nft("list", "tables")
    assert rt.connect(env.topo.remote, VIP, 8080).startswith(f"server:8080 local={env.pa.ip}:8080"), "not captured"
