"""One pod's connections through its node's agent are bounded (--max-connections-per-client, here through the
environment the DaemonSet would set): every pod of a node shares the agent's descriptors, and a pod that opened
thousands took them all (the security review measured 4,402 idle connections exhausting a lab agent's 20,000, after
which accept failed with EMFILE for every pod). Over the bound a connection is reset and counted; the pod's others
and every other pod keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import Lab
from lab.observe import metric_lines, metrics
from tests.integration.conftest import LabFactory
from tests.support.mesh import connect, echo_from, echo_on, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "basic"
LIMIT = 3
SERVER_1 = ("10.244.2.10", 9000)  # demo/server-1, on the other node


def _closed_at_once(lab: Lab, pod: str, dst: tuple[str, int]) -> bool:
    """Whether the agent resets a new connection of ``pod`` to ``dst`` (the kernel completes the handshake for the
    listener; the agent drops the connection at accept). The reset may reach the client before its connect returns;
    a connection held open (a timeout) is not closed."""
    try:
        with connect(lab, pod, *dst) as sock:
            sock.settimeout(5)
            return sock.recv(1) == b""
    except ConnectionError:
        return True


def test_a_pods_connections_over_the_bound_are_reset_and_counted(
    lab_factory: LabFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMBIT_MAX_CONNECTIONS_PER_CLIENT", str(LIMIT))
    lab = lab_factory(EXAMPLE, mesh=True)
    held = [connect(lab, "demo/client", *SERVER_1) for _ in range(LIMIT)]
    try:
        for sock in held:  # each is relayed: the echo answers
            sock.sendall(b"a")
            assert sock.recv(1) == b"a"
        assert _closed_at_once(lab, "demo/client", SERVER_1)
        assert echo_from(lab, "demo/server-2", *SERVER_1)[0] == "ok", "another pod is not held back"

        def counted() -> bool:
            lines = metric_lines(
                metrics(lab, "node1"), "ambit_connection_errors_total", reason="client_connection_limit"
            )
            return any(line.endswith(" 1.0") for line in lines)

        wait_for(counted, "the refusal counted on node1's agent")
    finally:
        for sock in held:
            sock.close()
    # once the agent saw the pod's connections end, it may connect again
    wait_for(lambda: echo_on(connect(lab, "demo/client", *SERVER_1))[0] == "ok", "the pod served again")


def test_one_clients_hbone_connections_over_the_bound_are_reset(
    lab_factory: LabFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """15008 is bounded per client address too: agents tunnel from the client pod's address, so a peer's
    connections are its pods', pooled (one per destination pod). legacy/web, on server-1's node, holds LIMIT
    connections to server-1's port 15008 that never start TLS; the next is reset, and an enrolled pod of another
    node still reaches server-1 through its own agent's tunnel."""
    monkeypatch.setenv("AMBIT_MAX_CONNECTIONS_PER_CLIENT", str(LIMIT))
    lab = lab_factory(EXAMPLE, mesh=True)
    hbone = (SERVER_1[0], 15008)
    held = [connect(lab, "legacy/web", *hbone) for _ in range(LIMIT)]
    try:
        for sock in held:  # accepted and waiting for a ClientHello: nothing to read, not closed
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        assert _closed_at_once(lab, "legacy/web", hbone), "the connection over the bound is closed"
        wait_for(
            lambda: any(
                line.endswith(" 1.0")
                for line in metric_lines(
                    metrics(lab, "node2"), "ambit_connection_errors_total", reason="client_connection_limit"
                )
            ),
            "the refusal counted on node2's agent",
        )
        assert echo_on(connect(lab, "demo/client", *SERVER_1))[0] == "ok", "another client is not held back"
    finally:
        for sock in held:
            sock.close()
