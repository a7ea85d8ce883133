"""The mesh lab under churn: agents killed and restarted while pods keep connecting.

One lab for the module (bench/topology/mesh: client and server-local on node1, server on node2). A restarted agent
finds the previous one's pinned filters steering SYNs to its listeners from the moment they exist; until then they
are dropped (fail closed) and the client's kernel sends them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab, netns
from lab.mesh import wait_ready
from lab.observe import agent_log, metric_lines, metrics
from tests.support.mesh import connect_through_restart, echo_through, kill_and_reap, wait_for

TOPOLOGY = Path(__file__).resolve().parents[2] / "bench" / "topology" / "mesh"
ECHO = 9000
SERVER = "10.71.2.10"  # bench-mesh/server on node2
PROBE = 9100  # a port no lab workload serves


@pytest.fixture(scope="module")
def mesh(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(TOPOLOGY, name=f"ambit-ch{secrets.token_hex(2)}", mesh=True)
    try:
        yield lab
    finally:
        lab.down()


async def _echo(lab: Lab, payload: bytes) -> str:
    return await echo_through(lab, "client", (SERVER, ECHO), payload)


@pytest.mark.parametrize("agent", ["agent-node1", "agent-node2"])
def test_connections_arriving_while_a_restarted_agent_starts_are_served(mesh: Lab, agent: str) -> None:
    """Source side (node1, outbound capture) and destination side (node2, HBONE capture): a connection accepted
    before the agent had loaded its last good state was refused as unknown_source/unknown_destination (a reset,
    for as long as the BPF programs took to compile) instead of being carried."""
    assert asyncio.run(_echo(mesh, b"warm")) == "ok"
    outcomes = connect_through_restart(mesh, agent, (SERVER, ECHO))
    failed = [o for o in outcomes if o != "ok"]
    refused = [
        r
        for r in agent_log(mesh, agent.removeprefix("agent-"))
        if r.get("error") in ("unknown_source", "unknown_destination")
    ]
    assert len(outcomes) > 10, "connections must have been attempted while the agent started"
    assert not failed, f"{len(failed)} of {len(outcomes)} connections failed across the restart: {failed[:3]}"
    assert not refused, f"the restarted agent refused connections it had state for: {refused[:2]}"


def _rss_kib(lab: Lab, agent: str) -> int:
    for line in Path(f"/proc/{lab.process(agent).pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {agent}")


def _open_streams(lab: Lab, node: str) -> float:
    text = metrics(lab, node)
    return sum(float(line.rsplit(" ", 1)[1]) for line in metric_lines(text, "istio_tcp_sockets_open"))


def test_agent_memory_returns_after_a_burst_of_stalled_streams(mesh: Lab) -> None:
    """Twenty connections whose peers stop reading fill every buffer the path has (the echo server stops reading
    once its replies back up, so both agents hold each stream's window and backlog), while other connections on the
    same pooled HBONE connection keep flowing; once they close, the agents give that memory back. With glibc's
    dynamic mmap threshold the relays' buffers came from the heap and stayed: all of the growth was kept."""
    agents = ("agent-node1", "agent-node2")
    baseline = {a: _rss_kib(mesh, a) for a in agents}
    socks = []
    for _ in range(20):
        with netns.enter(mesh.pod("client").netns):
            socks.append(socket.create_connection((SERVER, ECHO), timeout=10))
    chunk = b"s" * 65536
    try:
        for s in socks:
            s.setblocking(False)
        while writable := select.select([], socks, [], 1.0)[1]:  # until the path takes no more: nobody reads
            for s in writable:
                with contextlib.suppress(BlockingIOError):
                    s.send(chunk)
        assert asyncio.run(_echo(mesh, os.urandom(100_000))) == "ok", "a stalled stream must not block the others"
        peak = {a: _rss_kib(mesh, a) for a in agents}
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: _open_streams(mesh, "node1") == 0 == _open_streams(mesh, "node2"), "the stalled streams to close")
    for a in agents:
        grown = peak[a] - baseline[a]
        assert grown > 20_000, f"{a}: the stalled streams must have cost memory ({baseline[a]} -> {peak[a]} KiB)"

    def given_back(a: str) -> bool:  # the agent's heap trimmer looks every 5 s (agent/heap.py)
        return _rss_kib(mesh, a) - baseline[a] < (peak[a] - baseline[a]) / 2

    for a in agents:
        wait_for(
            lambda a=a: given_back(a),  # type: ignore[misc]
            f"{a} to give back half of what it grew: RSS {baseline[a]} KiB before, {peak[a]} KiB while stalled",
            timeout=15,
        )


def _listen_in(lab: Lab, pod: str) -> socket.socket:
    """A listener of the test's own in ``pod`` (the lab's echo server cannot say how its connection ended)."""
    with netns.enter(lab.pod(pod).netns):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", PROBE))
    ls.listen(8)
    ls.settimeout(10)
    return ls


def _how_it_ended(sock: socket.socket) -> str:
    sock.settimeout(10)  # liveness bound
    try:
        data = sock.recv(100)
    except OSError as e:
        return type(e).__name__
    return "EOF" if not data else f"data {data!r}"


@pytest.mark.parametrize(
    ("agent", "pod"),
    [("agent-node1", "server"), ("agent-node2", "server"), ("agent-node1", "server-local")],
    ids=["source-agent", "destination-agent", "same-node"],
)
def test_an_agent_killed_mid_stream_resets_its_pods_connections(mesh: Lab, agent: str, pod: str) -> None:
    """Old connections must fail as failures: the kernel closed a killed agent's sockets with FIN, so the pod on its
    side read a clean end of stream (a truncated transfer that looks complete), while the other side got RST."""
    with contextlib.closing(_listen_in(mesh, pod)) as ls:
        with netns.enter(mesh.pod("client").netns):
            client = socket.create_connection((mesh.pod(pod).ip, PROBE), timeout=10)
        server, _ = ls.accept()
    with client, server:
        client.sendall(b"q" * 1000)
        assert len(server.recv(2000)) == 1000
        server.sendall(b"r" * 1000)
        assert len(client.recv(2000)) == 1000
        old = mesh.process(agent)
        kill_and_reap(old.pid)
        ends = {"client": _how_it_ended(client), "server": _how_it_ended(server)}
    node = mesh.node(agent.removeprefix("agent-"))
    wait_ready(node.netns, node.ip, 15021, mesh.spawn(old.netns, list(old.argv), old.name, role=old.role))
    assert ends == {"client": "ConnectionResetError", "server": "ConnectionResetError"}


def test_every_connection_a_pod_resets_at_once_is_in_the_access_log(mesh: Lab) -> None:
    """connect() then RST, as a connect scan does: the agent accepts each, and its handler found the socket without
    a peer (ENOTCONN) and dropped it unlogged and uncounted. Each must leave a line naming the pod's address."""
    start = len(agent_log(mesh, "node1"))
    ports = set()
    for _ in range(200):
        with netns.enter(mesh.pod("client").netns):
            sock = socket.create_connection((SERVER, ECHO), timeout=10)
        ports.add(sock.getsockname()[1])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def logged() -> set[int]:
        lines = agent_log(mesh, "node1")[start:]
        client = mesh.pod("client").ip
        return {
            int(r["src.addr"].rsplit(":", 1)[1])
            for r in lines
            if r.get("direction") == "outbound" and r.get("src.addr", "").startswith(client + ":")
        }

    with contextlib.suppress(AssertionError):  # the count below says what is missing
        wait_for(lambda: ports <= logged(), "an access-log line for every connection", timeout=10)
    missing = ports - logged()
    assert not missing, f"{len(missing)} of {len(ports)} connections left no access-log line"
