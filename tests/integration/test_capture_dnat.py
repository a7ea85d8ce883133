"""Connections the node DNATs to an enrolled pod (what kube-proxy does for a Service VIP or a NodePort) are captured
after the rewrite (agent/capture_dnat.py), in the eBPF lab of examples/basic with a DNAT rule of our own on node2.

Before, the tc program saw the VIP, let the SYN pass, and the rewritten connection reached demo/server-1 uncaptured:
plaintext from legacy/web got through STRICT. Both nodes DNAT the VIPs, as kube-proxy does (a pod's connection is
rewritten on its own node, after the tc program captured an enrolled client's SYN).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyroute2 import Conntrack

from agent.capture_dnat import DnatCapture, table_name
from common import tls
from common.spiffe import Identity
from controller.ca import CertificateAuthority
from lab import Lab, client, netns
from lab.mesh import wait_ready
from lab.observe import agent_log, config_file
from tests.support.identity_pki import csr_pem
from tests.support.mesh import (
    STRICT_DEMO,
    connect,
    echo_from,
    kill_and_reap,
    nft,
    table_held_elsewhere,
    wait_for,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "basic"
VIP = "10.96.0.99"  # an address no lab interface has: only the DNAT rule gives it a meaning (demo/server-1)
SERVICE_VIP = "10.96.0.10"  # demo/server's ClusterIP (examples/basic/services.yaml): the agent knows it
VIP_WEB = "10.96.0.97"  # DNATed to legacy/web (not enrolled, node2)
PORT = 9000  # every lab pod's workload echoes here
NODEPORT_SERVER, NODEPORT_WEB = 30090, 30097  # on every node's own address, as kube-proxy's NodePorts
OUTBOUND_PORT = 15001  # the agent's outbound listener's port, DNATed on node2 to the same port of demo/server-1
HBONE_PORT = 15008  # DNATed to demo/server-1's: a Service whose targetPort is 15008, an east-west gateway


@pytest.fixture(scope="module")
def lab(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(EXAMPLE, name=f"ambit-dn{secrets.token_hex(2)}", mesh=True)
    try:
        server = lab.pod("demo/server-1").ip
        web = lab.pod("legacy/web").ip
        # Every node DNATs the VIPs, as kube-proxy does: a pod's connection is rewritten on its own node.
        rules = (
            "table ip test_dnat {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n"
            f"  ip daddr {VIP} tcp dport {{ {PORT}, {OUTBOUND_PORT}, {HBONE_PORT} }} dnat to {server}\n"
            f"  ip daddr {VIP_WEB} tcp dport {PORT} dnat to {web}\n"
            f"  ip daddr {SERVICE_VIP} tcp dport {PORT} dnat to {server}\n"  # a VIP the mesh knows (demo/server)
            # kube-proxy marks NodePort traffic for masquerade (0x4000) and masquerades it where it leaves the node
            f"  fib daddr type local tcp dport {NODEPORT_SERVER} meta mark set mark or 0x4000 dnat to {server}:{PORT}\n"
            f"  fib daddr type local tcp dport {NODEPORT_WEB} meta mark set mark or 0x4000 dnat to {web}:{PORT}\n }}\n"
            " chain postrouting {\n  type nat hook postrouting priority srcnat;\n"
            "  meta mark & 0x4000 == 0x4000 masquerade\n }\n}\n"
        )
        for node in ("node1", "node2"):
            nft(lab, node, "-f", "-", script=rules)
        yield lab
    finally:
        lab.down()


def _nft_table(lab: Lab) -> str:
    return nft(lab, "node2", "list", "tables")


def test_a_dnated_connection_goes_through_the_agent_and_is_answered_from_the_address_dialled(lab: Lab) -> None:
    assert "ambit_" in _nft_table(lab), "the agent installs its table in the node netns"
    web = lab.pod("legacy/web").ip
    server = lab.pod("demo/server-1").ip
    assert echo_from(lab, "legacy/web", VIP, PORT) == ("ok", VIP)

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
    with config_file(lab, "strict.yaml", STRICT_DEMO):
        wait_for(lambda: echo_from(lab, "legacy/web", server, PORT)[0] != "ok", "STRICT applied on node2")
        outcome, _ = echo_from(lab, "legacy/web", VIP, PORT)
        assert outcome.startswith("failed"), f"plaintext through the VIP must be refused under STRICT: {outcome}"
        assert echo_from(lab, "demo/client", server, PORT)[0] == "ok", "mesh traffic still passes"
    denied = [
        r for r in agent_log(lab, "node2") if r.get("direction") == "inbound" and r.get("policy.decision") == "deny"
    ]
    assert denied, "the agent refused it (not the network)"
    wait_for(lambda: echo_from(lab, "legacy/web", VIP, PORT)[0] == "ok", "plaintext allowed again without STRICT")


def test_an_enrolled_client_dialling_an_address_its_own_node_dnats_reaches_a_remote_pod(lab: Lab) -> None:
    """demo/client's SYN is captured (to 15001) at its veth before its node rewrites the VIP; the connection's later
    packets, rewritten too, must still reach the agent's socket, whatever the endpoint: before, they were routed to
    the endpoint, which reset them."""
    client = lab.pod("demo/client").ip
    server = lab.pod("demo/server-1").ip
    assert echo_from(lab, "demo/client", VIP, PORT) == ("ok", VIP)
    assert echo_from(lab, "demo/client", VIP_WEB, PORT) == ("ok", VIP_WEB), "to a pod outside the mesh (passthrough)"
    carried = [
        r
        for r in agent_log(lab, "node1")
        if r.get("direction") == "outbound"
        and str(r.get("src.addr", "")).startswith(f"{client}:")
        and r.get("dst.hbone_addr") == f"{server}:{PORT}"
    ]
    assert carried and carried[-1]["security"] == "mutual_tls", "node1's agent carried it in HBONE"


def test_an_enrolled_client_dialling_a_service_its_node_dnats_is_routed_and_reported_as_that_service(lab: Lab) -> None:
    """Capture takes the SYN before kube-proxy rewrites the VIP, so the accepted socket names the endpoint kube-proxy
    picked; the agent reads the VIP the pod dialled from conntrack (SO_ORIGINAL_DST) and balances the service itself,
    as ztunnel (which sees the VIP inside the pod) does: its telemetry names the service."""
    client = lab.pod("demo/client").ip
    assert echo_from(lab, "demo/client", SERVICE_VIP, PORT) == ("ok", SERVICE_VIP)

    def lines() -> list[dict[str, object]]:
        return [
            r
            for r in agent_log(lab, "node1")
            if r.get("direction") == "outbound"
            and str(r.get("src.addr", "")).startswith(f"{client}:")
            and r.get("dst.service") == "server.demo.svc.cluster.local"
        ]

    wait_for(lambda: bool(lines()), "node1's agent reports the connection against demo/server")
    assert lines()[-1]["security"] == "mutual_tls"


def test_a_nodeport_from_outside_is_captured_for_an_enrolled_pod_only(lab: Lab) -> None:
    """From the core netns to node2's own address: to demo/server-1 node2's agent carries it; to legacy/web (outside
    the mesh) the DNAT is left alone, no agent sees it."""
    node2 = lab.node("node2").ip
    core = lab.core_ip
    server = lab.pod("demo/server-1").ip
    web = lab.pod("legacy/web").ip
    assert echo_from(lab, "core", node2, NODEPORT_SERVER) == ("ok", node2)
    assert echo_from(lab, "core", node2, NODEPORT_WEB) == ("ok", node2)

    def seen(dst: str) -> list[dict[str, object]]:
        return [
            r
            for r in agent_log(lab, "node2")
            if str(r.get("src.addr", "")).startswith(f"{core}:") and r.get("dst.addr") == f"{dst}:{PORT}"
        ]

    wait_for(lambda: bool(seen(server)), "node2's agent carries the NodePort connection to server-1")
    assert seen(server)[-1]["direction"] == "inbound" and seen(server)[-1]["security"] == "plaintext"
    assert not seen(web), f"a DNAT to a pod outside the mesh is not the agent's: {seen(web)}"


def test_a_nodeport_to_another_nodes_pod_is_masqueraded_there_and_captured_at_the_endpoint(lab: Lab) -> None:
    """Through node1's NodePort to demo/server-1 on node2: node1 DNATs and masquerades (as kube-proxy), so node2
    sees a plain connection from node1 to its pod (the uplink's program captures it) and the reply goes back through
    node1's conntrack entry: the client sees the address it dialled."""
    node1 = lab.node("node1").ip
    server = lab.pod("demo/server-1").ip
    assert echo_from(lab, "core", node1, NODEPORT_SERVER) == ("ok", node1)
    wait_for(
        lambda: any(
            r.get("direction") == "inbound"
            and str(r.get("src.addr", "")).startswith(f"{node1}:")
            and r.get("dst.addr") == f"{server}:{PORT}"
            for r in agent_log(lab, "node2")
        ),
        "node2's agent carries it, from node1's address",
    )


def test_a_dnated_connection_to_an_agent_port_of_an_enrolled_pod_is_inbound_plaintext(lab: Lab) -> None:
    """Through a DNAT to demo/server-1:15001, legacy/web's connection went to the agent's outbound listener, which
    took the non-mesh pod for a mesh client: it got web a certificate and tunnelled to server-1 as web in mTLS. It is
    plaintext to an enrolled pod, as when web dials server-1:15001 itself (refused there as a call to the agent)."""
    web = lab.pod("legacy/web").ip
    server = lab.pod("demo/server-1").ip
    echo_from(lab, "legacy/web", VIP, OUTBOUND_PORT)

    def lines(direction: str) -> list[dict[str, object]]:
        return [
            r
            for r in agent_log(lab, "node2")
            if r.get("direction") == direction and str(r.get("src.addr", "")).startswith(f"{web}:")
        ]

    wait_for(
        lambda: any(r.get("dst.addr") == f"{server}:{OUTBOUND_PORT}" for r in lines("inbound_plaintext")),
        "node2's agent handles it as plaintext inbound",
    )
    assert not lines("outbound"), f"a non-mesh pod is never a mesh client: {lines('outbound')}"


def test_hbone_the_node_dnats_to_an_enrolled_pods_port_15008_is_terminated_by_its_agent(lab: Lab) -> None:
    """A mesh client's HBONE through a VIP to demo/server-1:15008 (as an east-west gateway forwards it): node2's agent
    terminates it with server-1's certificate and carries the CONNECT to server-1. Before, the table sent it to the
    plaintext listener, which relayed the TLS bytes to server-1:15008, where nothing listens."""
    server = lab.pod("demo/server-1").ip
    caller = Identity("cluster.local", "legacy", "gateway")
    ca = CertificateAuthority(lab.state_dir / "ca", "cluster.local")
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_csr(csr_pem(key), caller, 600)
    key_text = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    ctx = tls.client_context(ca.roots_pem(), "".join(chain), key_text, alpn=[tls.ALPN_H2])
    data = os.urandom(1000)
    with ctx.wrap_socket(connect(lab, "legacy/web", VIP, HBONE_PORT), server_hostname=None) as sock:
        peer = tls.peer_identity(sock)
        status, got = _hbone_echo(sock, f"{server}:{PORT}", data)
    assert str(peer) == "spiffe://cluster.local/ns/demo/sa/server", "server-1's certificate, from its node's agent"
    assert (status, got) == ("200", data)
    wait_for(
        lambda: any(
            r.get("direction") == "inbound"
            and r.get("src.identity") == str(caller)
            and r.get("dst.hbone_addr") == f"{server}:{PORT}"
            for r in agent_log(lab, "node2")
        ),
        "node2's agent logs the tunnelled connection",
    )


def _hbone_echo(sock: socket.socket, authority: str, data: bytes) -> tuple[str, bytes]:
    """One CONNECT to ``authority`` on an HBONE connection (``sock``, TLS done): (its status, what came back)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
    conn.send_data(1, data, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, got, done = "", b"", False
    sock.settimeout(10)
    while not done and (chunk := sock.recv(65536)):
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived):
                for name, value in event.headers or ():
                    if name in (":status", b":status"):
                        status = value.decode() if isinstance(value, bytes) else str(value)
            elif isinstance(event, h2.events.DataReceived):
                got += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            done = done or isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset))
        sock.sendall(conn.data_to_send())
    return status, got


def test_a_table_nft_cannot_write_makes_the_agent_not_ready_naming_it_until_it_can(lab: Lab) -> None:
    """Someone's table of the agent's name that the kernel lets no one else change (nft's ``owner`` flag; it goes
    with the process holding it): node2's agent reports not ready, naming the table, and is ready again, its table
    back, after the next reconcile that can write it. Before, it only logged ``capture:dnat`` and stayed ready while
    plaintext through VIPs reached enrolled pods unchecked."""
    node = lab.node("node2")
    table = table_name(node.netns)
    with table_held_elsewhere(node.netns, table):
        _reconcile(lab)
        wait_for(lambda: _ready(lab)[0] == 503, "node2's agent not ready")
        body = _ready(lab)[1]
        assert "capture:dnat" in body and table in body, body
    _reconcile(lab)
    wait_for(lambda: _ready(lab)[0] == 200, "ready again once the table is written")
    assert lab.pod("demo/server-1").ip in nft(lab, "node2", "list", "table", "inet", table)


def _ready(lab: Lab) -> tuple[int, str]:
    node = lab.node("node2")
    status, body = client.http_get(node.netns, node.ip, 15021, "/healthz/ready", timeout=2.0)
    return status, body.decode()


def _reconcile(lab: Lab) -> None:
    """Have node2's agent reconcile now: an interface appearing in its netns is a change it follows."""
    name = f"dn{secrets.token_hex(3)}"
    node = lab.node("node2").netns
    subprocess.run(["ip", "-n", node, "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True)
    subprocess.run(["ip", "-n", node, "link", "del", name], check=True)


def test_a_captured_connection_outlives_its_conntrack_entry(lab: Lab) -> None:
    """A conntrack entry can go while its connection lives (kube-proxy sets a 24 h established timeout, an idle
    connection outlasts it; a flush). The client's next packet is picked up mid-stream and DNATed again, but carries
    no capture mark: it must still find the agent's socket, not the pod (which resets it)."""
    data = os.urandom(100)
    socks = {pod: connect(lab, pod, VIP, PORT) for pod in ("legacy/web", "demo/client")}
    try:
        for sock in socks.values():
            sock.sendall(data)
            assert _read(sock, len(data)) == data
        for node in ("node1", "node2"):
            with netns.enter(lab.node(node).netns):
                conntrack = Conntrack()
                try:
                    conntrack.flush()
                finally:
                    conntrack.close()
        outcome = {}
        for pod, sock in socks.items():
            try:
                sock.sendall(data)
                outcome[pod] = "ok" if _read(sock, len(data)) == data else "bytes differ"
            except OSError as e:
                outcome[pod] = f"failed: {e}"
    finally:
        for sock in socks.values():
            sock.close()
    assert outcome == {"legacy/web": "ok", "demo/client": "ok"}


def test_while_the_agent_is_down_a_dnated_syn_is_dropped_and_captured_again_after(lab: Lab) -> None:
    """The table outlives the agent (as the tc filters do): with no listener the SYN is dropped, never passed to the
    pod in plaintext (fail closed); the next agent takes the table over and captures again."""
    web = lab.pod("legacy/web").ip

    def carried() -> int:
        return sum(
            r.get("direction") == "inbound" and str(r.get("src.addr", "")).startswith(f"{web}:")
            for r in agent_log(lab, "node2")
        )

    before = carried()
    old = lab.process("agent-node2")
    node = lab.node("node2")
    kill_and_reap(old.pid)
    try:
        assert table_name(node.netns) in _nft_table(lab), "the table stays while the agent is away"
        outcome = "ok"
        try:
            with connect(lab, "legacy/web", VIP, PORT, timeout=2):
                pass
        except OSError as e:
            outcome = f"failed: {e}"
        dropped = _drop_counter(lab, table_name(node.netns))
    finally:
        new = lab.spawn(old.netns, list(old.argv), old.name, role=old.role)
        wait_ready(node.netns, node.ip, 15021, new)
    assert "timed out" in outcome, f"dropped, not answered by the pod nor refused: {outcome}"
    # by the drop rule: the TPROXY rule, finding no listener, used to leave the SYN marked, so the drop rule (for
    # unmarked SYNs) never matched and it went on to local delivery with no socket, lost only by chance
    assert dropped > 0, "dropped and counted by the table's drop rule"
    assert echo_from(lab, "legacy/web", VIP, PORT) == ("ok", VIP)
    wait_for(lambda: carried() > before, "the new agent carried it")


def _drop_counter(lab: Lab, table: str) -> int:
    """Packets the table's IPv4 drop rule (SYNs with no listener to take them) counted."""
    out = nft(lab, "node2", "list", "chain", "inet", table, "prerouting")
    rules = [
        line
        for line in out.splitlines()
        if "@enrolled4" in line and "counter" in line and line.rstrip().endswith("drop")
    ]
    assert len(rules) == 1, out
    words = rules[0].split()
    return int(words[words.index("packets") + 1]) if "packets" in words else 0


def _read(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size and (chunk := sock.recv(65536)):
        got += chunk
    return got


def _nft_here(*args: str) -> str:
    """nft in the calling thread's netns (inside netns.enter)."""
    return subprocess.run(["nft", *args], capture_output=True, text=True, check=True).stdout


def test_the_table_is_replaced_whole_restored_and_removed(require_root: None) -> None:
    """In a netns of its own: a sync replaces the set's addresses (none left over), an unchanged set writes nothing,
    a table someone flushed away (a firewall reload) is written again at the next sync even with the set unchanged,
    and remove() (what `ambit-agent --cleanup` runs) leaves nothing."""
    name = f"ambit-dt{secrets.token_hex(2)}"
    netns.add(name)

    try:
        with netns.enter(name):
            capture = DnatCapture(name, port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00)
            capture.sync({"10.1.0.5", "fd00::5"})
            capture.sync({"10.1.0.6"})
            listing = _nft_here("list", "ruleset")
            handle = _nft_here("-a", "list", "table", "inet", capture.table).splitlines()[0]
            capture.sync({"10.1.0.6"})
            unchanged = _nft_here("-a", "list", "table", "inet", capture.table).splitlines()[0]
            _nft_here("flush", "ruleset")
            capture.sync({"10.1.0.6"})
            restored = _nft_here("list", "ruleset")
            assert capture.remove() is True
            after = _nft_here("list", "ruleset")
            assert capture.remove() is False, "nothing left to remove"
            capture.sync({"10.1.0.6"})
            capture.sync(set())  # nothing enrolled any more: no table, and no conntrack turned on for it
            emptied = _nft_here("list", "ruleset")
    finally:
        netns.delete(name)
    assert table_name(name) not in emptied
    assert "10.1.0.6" in listing and "10.1.0.5" not in listing and "fd00::5" not in listing
    assert "tproxy ip to :15006" in listing and "priority dstnat + 1" in listing
    assert unchanged == handle, "an unchanged set is not written again (the table keeps its handle)"
    assert restored == listing, "the flushed table is back as it was"
    assert table_name(name) not in after


def test_instances_of_one_netns_keep_their_own_tables(require_root: None) -> None:
    """Instance names may differ only in '-', '.' or '_': each still has a table of its own (before, 'a-b' and
    'a_b' shared one and each agent replaced the other's addresses)."""
    name = f"ambit-dt{secrets.token_hex(2)}"
    netns.add(name)
    try:
        with netns.enter(name):
            dash = DnatCapture(f"{name}-x", port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00)
            under = DnatCapture(f"{name}_x", port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00)
            dash.sync({"10.1.0.5"})
            under.sync({"10.1.0.6"})
            assert dash.remove() is True
            listing = _nft_here("list", "ruleset")
    finally:
        netns.delete(name)
    assert dash.table != under.table
    assert "10.1.0.6" in listing and "10.1.0.5" not in listing, listing


def test_a_bound_table_is_written_in_its_netns_whichever_thread_syncs(require_root: None) -> None:
    """A Redirector's reconcile may run in any thread (its netlink socket was bound at start, in the node netns);
    the table must go where capture was started, not into the calling thread's netns (tests reconciling from the
    root netns left ambit tables in the machine's own ruleset)."""
    name = f"ambit-dt{secrets.token_hex(2)}"
    netns.add(name)
    capture = DnatCapture(name, port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00)
    try:
        with netns.enter(name):
            capture.bind_netns()
        capture.sync({"10.1.0.7"})  # from this test's own netns
        here = _nft_here("list", "tables")
        with netns.enter(name):
            there = _nft_here("list", "ruleset")
        removed = capture.remove()
        with netns.enter(name):
            after = _nft_here("list", "tables")
    finally:
        capture.close()
        netns.delete(name)
    assert capture.table not in here, "nothing written where the sync was called"
    assert "10.1.0.7" in there
    assert removed and capture.table not in after
