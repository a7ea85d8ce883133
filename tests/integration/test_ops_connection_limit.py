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


def _reset(lab: Lab) -> bool:
    """Whether the agent resets a new connection of demo/client to server-1 (the kernel completes the handshake for
    the listener; the agent drops the connection at accept)."""
    try:
        with connect(lab, "demo/client", *SERVER_1) as sock:
            sock.sendall(b"x")
            return sock.recv(1) == b""
    except OSError:
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
        assert _reset(lab)
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
