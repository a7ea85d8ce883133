"""Connections the node DNATs to an enrolled pod (what kube-proxy does for a Service VIP or a NodePort) are captured
after the rewrite (agent/capture_dnat.py), in the eBPF lab of examples/basic with a DNAT rule of our own on node2.

Before, the tc program saw the VIP, let the SYN pass, and the rewritten connection reached demo/server-1 uncaptured:
plaintext from legacy/web got through STRICT.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture_dnat import DnatCapture, table_name
from lab import Lab, netns
from lab.observe import agent_log, config_file
from tests.support.mesh import connect, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "basic"
VIP = "10.96.0.99"  # an address no lab interface has: only the DNAT rule gives it a meaning
PORT = 9000  # every lab pod's workload echoes here

STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"""


@pytest.fixture(scope="module")
def lab(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(EXAMPLE, name=f"ambit-dn{secrets.token_hex(2)}", mesh=True)
    try:
        server = lab.pod("demo/server-1").ip
        rules = (
            "table ip test_dnat {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n"
            f"  ip daddr {VIP} tcp dport {PORT} dnat to {server}:{PORT}\n }}\n}}\n"
        )
        subprocess.run(
            ["nsenter", f"--net=/run/netns/{lab.node('node2').netns}", "nft", "-f", "-"],
            input=rules,
            text=True,
            check=True,
            capture_output=True,
        )
        yield lab
    finally:
        lab.down()


def _echo(lab: Lab, pod: str, ip: str) -> tuple[str, str]:
    """(outcome, the address that answered)."""
    data = os.urandom(1000)
    try:
        with connect(lab, pod, ip, PORT, timeout=5) as sock:
            peer = sock.getpeername()[0]
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
    except OSError as e:
        return f"failed: {e}", ""
    return ("ok" if got == data else f"{len(got)} bytes back"), peer


def _nft_table(lab: Lab) -> str:
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.node('node2').netns}", "nft", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_a_dnated_connection_goes_through_the_agent_and_is_answered_from_the_address_dialled(lab: Lab) -> None:
    assert "ambit_" in _nft_table(lab), "the agent installs its table in the node netns"
    web = lab.pod("legacy/web").ip
    server = lab.pod("demo/server-1").ip
    assert _echo(lab, "legacy/web", VIP) == ("ok", VIP)

    def logged() -> list[dict[str, object]]:
        return [
            r
            for r in agent_log(lab, "node2")
            if r.get("direction") == "inbound"
            and str(r.get("src.addr", "")).startswith(f"{web}:")
            and r.get("dst.addr") == f"{server}:{PORT}"
        ]

    wait_for(lambda: bool(logged()), "node2's agent logs the connection (it carried it)")
    assert logged()[-1]["security"] == "plaintext" and logged()[-1]["policy.decision"] == "allow", logged()[-1]


def test_strict_refuses_plaintext_the_node_dnats_to_an_enrolled_pod(lab: Lab) -> None:
    server = lab.pod("demo/server-1").ip
    with config_file(lab, "strict.yaml", STRICT):
        wait_for(lambda: _echo(lab, "legacy/web", server)[0] != "ok", "STRICT applied on node2")
        outcome, _ = _echo(lab, "legacy/web", VIP)
        assert outcome.startswith("failed"), f"plaintext through the VIP must be refused under STRICT: {outcome}"
        assert _echo(lab, "demo/client", server)[0] == "ok", "mesh traffic still passes"
    denied = [
        r for r in agent_log(lab, "node2") if r.get("direction") == "inbound" and r.get("policy.decision") == "deny"
    ]
    assert denied, "the agent refused it (not the network)"
    wait_for(lambda: _echo(lab, "legacy/web", VIP)[0] == "ok", "plaintext allowed again without STRICT")


def test_the_table_is_replaced_whole_and_removed(require_root: None) -> None:
    """In a netns of its own: a sync replaces the set's addresses (none left over), an unchanged set costs no nft
    call, and remove() (what `ambit-agent --cleanup` runs) leaves nothing."""
    name = f"ambit-dt{secrets.token_hex(2)}"
    netns.add(name)
    try:
        with netns.enter(name):
            capture = DnatCapture(name, port=15006, mark=0x200, mark_mask=0xF00)
            capture.sync({"10.1.0.5", "fd00::5"})
            capture.sync({"10.1.0.6"})
            listing = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
            capture.nft = "/nonexistent/nft"  # an unchanged set must not need nft at all
            capture.sync({"10.1.0.6"})
            capture.nft = "nft"
            assert capture.remove() is True
            after = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
            assert capture.remove() is False, "nothing left to remove"
    finally:
        netns.delete(name)
    assert "10.1.0.6" in listing and "10.1.0.5" not in listing and "fd00::5" not in listing
    assert "tproxy ip to :15006" in listing and "priority dstnat + 1" in listing
    assert table_name(name) not in after
