"""The whole mesh in the lab: controller + one agent per node netns, real eBPF capture, real HBONE mTLS.

One lab for the module (starting a mesh costs a few seconds); each test leaves the live config as it found it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab
from lab.observe import (
    Sniffer,
    agent_log,
    capture_status,
    config_file,
    http_json,
    metric_lines,
    metrics,
    sniff,
    workloads,
)
from tests.support.mesh import STRICT_DEMO, connect, fail_closed_drops, parallel_echo, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "basic"
ECHO = 9000
HTTP = 8080
SERVICE_VIP = "10.96.0.10"

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
"""


@pytest.fixture(scope="module")
def mesh(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(EXAMPLE, name=f"ambit-e2e-{secrets.token_hex(2)}", mesh=True)
    try:
        yield lab
    finally:
        lab.down()


def _ip(lab: Lab, pod: str) -> str:
    return lab.pod(pod).ip


def _echo_ok(lab: Lab, src: str, dst_ip: str, port: int = ECHO) -> bool:
    payload = os.urandom(1024)
    try:
        with connect(lab, src, dst_ip, port, timeout=3) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return got == payload
    except OSError:
        return False


def _sniff_link(lab: Lab) -> contextlib.AbstractContextManager[Sniffer]:
    """Everything node1 sends to or receives from the other nodes (its port on the lab's bridge)."""
    return sniff(lab.plan.core_netns, lab.node("node1").core_link)


def _access(lab: Lab, node: str, **fields: str) -> list[dict[str, object]]:
    return [
        r for r in agent_log(lab, node) if r.get("scope") == "access" and all(r.get(k) == v for k, v in fields.items())
    ]


def test_cross_node_and_same_node_bytes_are_intact_under_many_streams(mesh: Lab) -> None:
    for target in ("demo/server-1", "demo/server-2"):
        pairs = parallel_echo(mesh, "demo/client", _ip(mesh, target), ECHO, streams=16, size=512 * 1024)
        assert all(sent == got for sent, got in pairs), f"corrupted echo through the mesh to {target}"
    # Both paths really went through the agents: an outbound HBONE and a same-node record, with both identities.
    hbone = _access(mesh, "node2", direction="inbound", path="hbone")
    assert hbone and hbone[-1]["src.identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert hbone[-1]["dst.identity"] == "spiffe://cluster.local/ns/demo/sa/server"
    assert _access(mesh, "node1", direction="outbound", path="same_node")


def test_service_vip_is_load_balanced_to_endpoints(mesh: Lab) -> None:
    seen = set()
    for _ in range(12):
        with connect(mesh, "demo/client", SERVICE_VIP, 80) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := s.recv(65536):
                body += chunk
        seen.add(body.split(b'"pod": "', 1)[1].split(b'"', 1)[0].decode())
    assert seen == {"server-1", "server-2"}


def test_node_link_carries_only_tls_for_enrolled_pods(mesh: Lab) -> None:
    marker = b"AMBIT-PLAINTEXT-" + secrets.token_hex(8).encode()
    legacy_marker = b"LEGACY-PLAINTEXT-" + secrets.token_hex(8).encode()
    with _sniff_link(mesh) as wire:
        with connect(mesh, "demo/client", _ip(mesh, "demo/server-1"), ECHO) as s:
            s.sendall(marker)
            assert s.recv(100) == marker
        # Proof the sniffer sees plaintext when there is some: a non-mesh pod's traffic to another node.
        with connect(mesh, "legacy/web", _ip(mesh, "demo/client"), ECHO) as s:
            s.sendall(legacy_marker)
            assert s.recv(100) == legacy_marker
    assert wire.saw(legacy_marker), "sniffer saw nothing: the check below would prove nothing"
    assert not wire.saw(marker), "enrolled pod's payload crossed the node link in plaintext"
    assert 15008 in wire.ports()


def test_deny_policy_blocks_one_caller_while_others_pass(mesh: Lab) -> None:
    server = _ip(mesh, "demo/server-1")
    assert _echo_ok(mesh, "demo/client", server) and _echo_ok(mesh, "legacy/web", server)
    with config_file(mesh, "deny-client.yaml", DENY_CLIENT):
        wait_for(lambda: not _echo_ok(mesh, "demo/client", server), "DENY policy to reach node2")
        assert _echo_ok(mesh, "legacy/web", server)
        denied = _access(mesh, "node2", response_flags="DENY")
        assert denied and denied[-1]["src.identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    wait_for(lambda: _echo_ok(mesh, "demo/client", server), "DENY policy removal")


SLICED_SERVICE_VIP = "10.96.0.77"
SLICED_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: legacy-db, namespace: demo}
spec: {clusterIP: 10.96.0.77, ports: [{name: pg, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-db-manual
  namespace: demo
  labels: {kubernetes.io/service-name: legacy-db}
addressType: IPv4
ports: [{name: pg, port: 9000}]
endpoints:
  - addresses: [10.244.2.20]
"""


def test_a_service_without_selector_is_balanced_over_its_endpointslice(mesh: Lab) -> None:
    """Endpoints kept by hand (an external database, a VM): the agent balances the VIP over the slice's endpoint,
    here legacy/web's echo port, outside the mesh. The lab has no kube-proxy, so before EndpointSlices were read
    (the VIP passed through) nothing answered it."""
    with config_file(mesh, "legacy-db.yaml", SLICED_SERVICE):
        wait_for(lambda: _echo_ok(mesh, "demo/client", SLICED_SERVICE_VIP, 5432), "the slice's endpoint to answer")
        web = f"{_ip(mesh, 'legacy/web')}:9000"
        wait_for(lambda: bool(_access(mesh, "node1", **{"dst.service": "legacy-db.demo.svc.cluster.local"})), "its log")
        out = _access(mesh, "node1", **{"dst.service": "legacy-db.demo.svc.cluster.local"})
        assert out[-1]["dst.addr"] == web and out[-1]["direction"] == "outbound", out[-1]


def test_strict_denies_plaintext_from_a_non_mesh_pod(mesh: Lab) -> None:
    server = _ip(mesh, "demo/server-1")
    with config_file(mesh, "strict.yaml", STRICT_DEMO):
        wait_for(lambda: not _echo_ok(mesh, "legacy/web", server), "STRICT to deny plaintext")
        assert _echo_ok(mesh, "demo/client", server), "mTLS caller must still pass under STRICT"
    wait_for(lambda: _echo_ok(mesh, "legacy/web", server), "STRICT removal")


def test_policy_change_closes_an_established_connection(mesh: Lab) -> None:
    with connect(mesh, "demo/client", _ip(mesh, "demo/server-1"), ECHO, timeout=20) as s:
        s.sendall(b"ping")
        assert s.recv(10) == b"ping"
        with config_file(mesh, "deny-client.yaml", DENY_CLIENT):
            # The agent closes the now-denied connection: the client sees EOF or a reset, never more echo.
            try:
                closed = s.recv(10) == b""
            except ConnectionResetError:
                closed = True
            assert closed
    wait_for(
        lambda: any(
            str(r.get("error", "")).startswith("AuthorizationPolicyLateRejection") for r in _access(mesh, "node2")
        ),
        "the access log to record the late rejection of the established connection",
    )
    wait_for(lambda: _echo_ok(mesh, "demo/client", _ip(mesh, "demo/server-1")), "DENY policy removal")


def test_metrics_carry_istio_labels(mesh: Lab) -> None:
    assert _echo_ok(mesh, "demo/client", _ip(mesh, "demo/server-1"))
    text = metrics(mesh, "node2")
    lines = metric_lines(
        text,
        "istio_tcp_connections_opened_total",
        reporter="destination",
        source_principal="spiffe://cluster.local/ns/demo/sa/client",
        destination_workload="server-1",
        connection_security_policy="mutual_tls",
    )
    assert lines, "no destination-reported mTLS connection metric for client -> server-1"
    assert metric_lines(text, "istio_tcp_received_bytes_total", reporter="destination")
    assert metric_lines(metrics(mesh, "node1"), "istio_tcp_connections_opened_total", reporter="source")
    assert metric_lines(text, "ambit_capture_connections_total", ip=_ip(mesh, "demo/server-1"), direction="inbound")


def test_namespace_enrolled_and_unenrolled_live(mesh: Lab) -> None:
    ns_file = Path(mesh.config_dir) / "namespaces.yaml"
    original = ns_file.read_text()
    client_ip = _ip(mesh, "demo/client")

    def enrolled(node: str) -> bool:
        return client_ip in capture_status(mesh, node).get("enrolled", [])

    try:
        ns_file.write_text(original.replace("istio.io/dataplane-mode: ambient", "istio.io/dataplane-mode: none"))
        wait_for(lambda: not enrolled("node1"), "demo to be released from capture")
        assert all(w["protocol"] != "HBONE" for w in workloads(mesh, "node1") if w["namespace"] == "demo")
        marker = b"UNENROLLED-" + secrets.token_hex(8).encode()
        with (
            _sniff_link(mesh) as wire,
            connect(mesh, "demo/client", _ip(mesh, "demo/server-1"), ECHO) as s,
        ):
            s.sendall(marker)
            assert s.recv(100) == marker
        assert wire.saw(marker), "an un-enrolled pod talks plaintext, untouched by the mesh"
    finally:
        ns_file.write_text(original)
    wait_for(lambda: enrolled("node1"), "demo to be captured again")
    wait_for(lambda: _echo_ok(mesh, "demo/client", _ip(mesh, "demo/server-1")), "traffic through the mesh again")


def test_agent_stopped_fails_closed_and_restart_resumes_capture(mesh: Lab) -> None:
    server, client_ip = _ip(mesh, "demo/server-1"), _ip(mesh, "demo/client")

    def drops() -> float:
        return fail_closed_drops(mesh, "node1", client_ip)

    before = drops()
    mesh.stop("agent-node1")
    try:
        marker = b"FAILCLOSED-" + secrets.token_hex(8).encode()
        with _sniff_link(mesh) as wire, pytest.raises(OSError):
            connect(mesh, "demo/client", server, ECHO, timeout=2).sendall(marker)
        assert not wire.saw(marker)
        assert not any(dport == ECHO for _, dport, _ in wire.tcp_payloads()), "a SYN left the node with no agent"
    finally:
        mesh.restart("agent-node1")
    wait_for(lambda: _echo_ok(mesh, "demo/client", server), "restarted agent to carry traffic", timeout=60)
    # Traffic flows through the previous agent's pinned filters before the new one has compiled and adopted them.
    wait_for(lambda: client_ip in capture_status(mesh, "node1").get("enrolled", []), "capture to be adopted")
    status = capture_status(mesh, "node1")
    assert status.get("adopted"), "the restarted agent must adopt the pinned maps and filters"
    assert drops() > before, "the kernel must count the fail-closed drop (in maps that survived the restart)"


def test_sigterm_drains_established_connections(mesh: Lab) -> None:
    record = mesh.process("agent-node1")
    with connect(mesh, "demo/client", _ip(mesh, "demo/server-1"), ECHO, timeout=20) as s:
        s.sendall(b"before")
        assert s.recv(10) == b"before"
        os.kill(record.pid, signal.SIGTERM)
        wait_for(
            lambda: any(r.get("msg") == "draining" for r in agent_log(mesh, "node1")), "the agent to start draining"
        )
        s.sendall(b"during")  # the established connection keeps working while the agent drains
        assert s.recv(10) == b"during"
        try:
            closed = s.recv(10) == b""  # then the agent's exit ends it
        except ConnectionResetError:
            closed = True
        assert closed
    wait_for(lambda: any(r.get("msg") == "stopped" for r in agent_log(mesh, "node1")), "a clean agent exit")
    mesh.restart("agent-node1")
    wait_for(lambda: _echo_ok(mesh, "demo/client", _ip(mesh, "demo/server-1")), "the agent back", timeout=60)


def test_draining_destination_agent_sends_its_hbone_clients_elsewhere(mesh: Lab) -> None:
    """SIGTERM on the server's node: its agent tells the client's agent GOAWAY on their pooled HBONE connection,
    so the next connection dials again, while the established one keeps working through the drain."""
    record = mesh.process("agent-node2")
    with connect(mesh, "demo/client", _ip(mesh, "demo/server-1"), ECHO, timeout=20) as s:
        s.sendall(b"before")
        assert s.recv(10) == b"before"
        pooled = http_json(mesh, "node1", 15000, "/config_dump", host="127.0.0.1")["pool"]
        assert any(p["usable"] for p in pooled), pooled
        os.kill(record.pid, signal.SIGTERM)
        wait_for(
            lambda: any(
                r.get("msg") == "sent GOAWAY to HBONE clients" and r.get("connections", 0) >= 1
                for r in agent_log(mesh, "node2")
            ),
            "the draining agent to send GOAWAY",
        )
        s.sendall(b"during")
        assert s.recv(10) == b"during"
        wait_for(
            lambda: (
                not any(p["usable"] for p in http_json(mesh, "node1", 15000, "/config_dump", host="127.0.0.1")["pool"])
            ),
            "the client's agent to stop using the drained connection",
        )
    wait_for(lambda: any(r.get("msg") == "stopped" for r in agent_log(mesh, "node2")), "a clean agent exit")
    mesh.restart("agent-node2")
    wait_for(lambda: _echo_ok(mesh, "demo/client", _ip(mesh, "demo/server-1")), "the agent back", timeout=60)


def test_cleanup_removes_filters_rules_and_pins(mesh: Lab) -> None:
    node = mesh.node("node1")
    veth = mesh.pod("demo/client").host_veth
    instance = node.netns
    mesh.stop("agent-node1")
    assert "ambit:" in mesh.exec("node1", ["tc", "filter", "show", "dev", veth, "ingress"]).stdout
    mesh.exec("node1", [sys.executable, "-m", "agent.main", "--cleanup", "--instance", instance])
    assert "ambit:" not in mesh.exec("node1", ["tc", "filter", "show", "dev", veth, "ingress"]).stdout
    assert "ambit:" not in mesh.exec("node1", ["tc", "filter", "show", "dev", node.uplink, "ingress"]).stdout
    assert "fwmark 0x200/0xf00" not in mesh.exec("node1", ["ip", "rule", "show"]).stdout
    assert not Path("/sys/fs/bpf/ambit", instance).exists()
