"""The mesh over IPv6 on a dual-stack lab (examples/dualstack): real eBPF capture of IPv6 pod traffic, HBONE mTLS to
the destination pod's IPv6 address on 15008, and every other path (same node, plaintext into the mesh, passthrough,
service VIPs, policy) over both families.

One lab for the module; each test leaves the live config as it found it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab
from lab.client import tcp_echo, who
from lab.observe import agent_log, capture_status, config_file, http_json, sniff, workloads
from tests.support.mesh import STRICT_DEMO, connect, fail_closed_drops, parallel_echo, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dualstack"
ECHO = 9000
HTTP = 8080
CLIENT, SERVER, LOCAL, LEGACY = "demo/client", "demo/server", "demo/local", "legacy/web"
FAMILIES = [pytest.param("ip6", id="ipv6"), pytest.param("ip", id="ipv4")]


DENY_CLIENT_IPV6 = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-ipv6, namespace: demo}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - from: [{source: {ipBlocks: ["fd00:10:244:1::/64"]}}]
"""


@pytest.fixture(scope="module")
def mesh(require_root: None) -> Iterator[Lab]:
    lab = Lab.up(EXAMPLE, name=f"ambit-ds-{secrets.token_hex(2)}", mesh=True)
    try:
        yield lab
    finally:
        lab.down()


def _ip(lab: Lab, pod: str, family: str) -> str:
    ip: str = getattr(lab.pod(pod), family)
    assert ip, f"{pod} has no {family} address: the lab did not plan it dual-stack"
    return ip


def _hostport(ip: str, port: int) -> str:
    """As the access log writes an address: IPv6 in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _access(lab: Lab, node: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        r for r in agent_log(lab, node) if r.get("scope") == "access" and all(r.get(k) == v for k, v in fields.items())
    ]


def _one_access(lab: Lab, node: str, **fields: Any) -> dict[str, Any]:
    """The access record of one connection (found by its fields), once the agent has written it at close."""
    wait_for(lambda: len(_access(lab, node, **fields)) == 1, f"one access record on {node} with {fields}")
    return _access(lab, node, **fields)[0]


def _caller_ip(seen: str) -> str:
    """The address part of the workload's `client` field (`ip:port`, an IPv6 address unbracketed)."""
    return seen.rsplit(":", 1)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_node_bytes_go_through_hbone_mtls_to_the_pods_address(mesh: Lab, family: str) -> None:
    client_ip, server_ip = _ip(mesh, CLIENT, family), _ip(mesh, SERVER, family)
    payload = os.urandom(1 << 20)
    with connect(mesh, CLIENT, server_ip, ECHO) as sock:
        src_port = sock.getsockname()[1]
        assert sock.family == (socket.AF_INET6 if family == "ip6" else socket.AF_INET)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest(), "echo corrupted"
    src = _hostport(client_ip, src_port)
    out = _one_access(mesh, "node1", direction="outbound", **{"src.addr": src})
    assert out["path"] == "hbone" and out["security"] == "mutual_tls"
    assert out["dst.addr"] == _hostport(server_ip, 15008), "the tunnel goes to the pod's own address on 15008"
    assert out["dst.hbone_addr"] == _hostport(server_ip, ECHO), "the CONNECT names the original destination"
    assert out["src.identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert out["dst.identity"] == "spiffe://cluster.local/ns/demo/sa/server"
    assert (out["bytes_sent"], out["bytes_recv"]) == (len(payload), len(payload))
    inbound = _one_access(mesh, "node2", direction="inbound", **{"src.addr": src})
    assert inbound["path"] == "hbone" and inbound["security"] == "mutual_tls"
    assert inbound["dst.addr"] == _hostport(server_ip, 15008), "as ztunnel logs it: where the tunnel arrived"
    assert inbound["dst.hbone_addr"] == _hostport(server_ip, ECHO)
    assert inbound["src.identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    # Many streams at once share pooled HBONE connections to that address, each stream's bytes intact.
    pairs = parallel_echo(mesh, CLIENT, server_ip, ECHO, streams=8, size=256 * 1024)
    assert all(sent == got for sent, got in pairs), f"corrupted echo over {family} under 8 streams"


def test_node_link_carries_enrolled_ipv6_traffic_only_inside_tls(mesh: Lab) -> None:
    marker = b"AMBIT-V6-PLAINTEXT-" + secrets.token_hex(8).encode()
    legacy_marker = b"AMBIT-V6-LEGACY-" + secrets.token_hex(8).encode()
    with sniff(mesh.plan.core_netns, mesh.node("node1").core_link) as wire:
        assert tcp_echo(mesh.pod(CLIENT).netns, _ip(mesh, SERVER, "ip6"), ECHO, marker) == marker
        # An enrolled pod calling a pod outside the mesh passes through in plaintext: what the sniffer must see.
        assert tcp_echo(mesh.pod(CLIENT).netns, _ip(mesh, LEGACY, "ip6"), ECHO, legacy_marker) == legacy_marker
    assert any(f[12:14] == b"\x86\xdd" for f in wire.frames), "no IPv6 frame on the node link"
    assert wire.saw(legacy_marker), "sniffer saw no IPv6 payload: the check below would prove nothing"
    assert not wire.saw(marker), "an enrolled pod's IPv6 payload crossed the node link in plaintext"
    assert 15008 in wire.ports()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("src", "dst", "node", "direction", "path"),
    [
        pytest.param(CLIENT, LOCAL, "node1", "outbound", "same_node", id="same-node"),
        pytest.param(LEGACY, CLIENT, "node1", "inbound", "plaintext", id="plaintext-into-mesh"),
        pytest.param(CLIENT, LEGACY, "node1", "outbound", "passthrough", id="passthrough"),
    ],
)
def test_other_paths_work_over_both_families(
    mesh: Lab, family: str, src: str, dst: str, node: str, direction: str, path: str
) -> None:
    dst_ip = _ip(mesh, dst, family)
    before = len(_access(mesh, node, direction=direction, path=path, **{"dst.addr": _hostport(dst_ip, HTTP)}))
    answer = who(mesh.pod(src).netns, dst_ip, HTTP)
    assert answer["pod"] == mesh.pod(dst).name
    # the mesh keeps the caller's address, passthrough included (the agent connects from the pod's address)
    assert _caller_ip(answer["client"]) == _ip(mesh, src, family)
    wait_for(
        lambda: (
            len(_access(mesh, node, direction=direction, path=path, **{"dst.addr": _hostport(dst_ip, HTTP)}))
            == before + 1
        ),
        f"{node} access record {direction} {path} to {dst_ip}",
    )


@pytest.mark.parametrize(
    ("vip", "family"),
    [
        pytest.param("fd00:10:96::10", "ip6", id="dual-stack-ipv6"),
        pytest.param("10.96.0.10", "ip", id="dual-stack-ipv4"),
        pytest.param("fd00:10:96::20", "ip6", id="ipv6-only"),
    ],
)
def test_service_vip_goes_to_an_endpoint_of_the_callers_family(mesh: Lab, vip: str, family: str) -> None:
    """examples/dualstack's Services: `server` has a VIP per family, `server-v6` only an IPv6 one."""
    with connect(mesh, CLIENT, vip, 80) as sock:
        src = _hostport(_ip(mesh, CLIENT, family), sock.getsockname()[1])
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    answer = json.loads(response.partition(b"\r\n\r\n")[2])
    assert _caller_ip(answer["server"]) == _ip(mesh, SERVER, family)
    assert _caller_ip(answer["client"]) == _ip(mesh, CLIENT, family)
    out = _one_access(mesh, "node1", direction="outbound", **{"src.addr": src})
    assert out["path"] == "hbone" and out["dst.addr"] == _hostport(_ip(mesh, SERVER, family), 15008)
    service = "server-v6" if vip.endswith("::20") else "server"
    assert out["dst.service"] == f"{service}.demo.svc.cluster.local"


def _reaches(lab: Lab, src: str, ip: str) -> bool:
    try:
        return bool(who(lab.pod(src).netns, ip, HTTP, timeout=3)["pod"] == "server")
    except OSError:
        return False


def test_ipv6_ip_block_policy_denies_that_family_only(mesh: Lab) -> None:
    v6, v4 = _ip(mesh, SERVER, "ip6"), _ip(mesh, SERVER, "ip")
    assert _reaches(mesh, CLIENT, v6) and _reaches(mesh, CLIENT, v4)
    with config_file(mesh, "deny-client-ipv6.yaml", DENY_CLIENT_IPV6):
        wait_for(lambda: not _reaches(mesh, CLIENT, v6), "the IPv6 ipBlock DENY to apply")
        assert _reaches(mesh, CLIENT, v4), "an IPv6 ipBlock denied an IPv4 caller"
        caller = f"[{_ip(mesh, CLIENT, 'ip6')}]:"
        denials = _access(mesh, "node2", direction="inbound", **{"policy.decision": "deny"})
        assert any(str(r["src.addr"]).startswith(caller) for r in denials), "node2 logged no IPv6 denial"
    wait_for(lambda: _reaches(mesh, CLIENT, v6), "the IPv6 caller to be allowed again")


def test_control_plane_runs_over_ipv6(mesh: Lab) -> None:
    """The agents know only the controller's IPv6 address, so their workloads and certificates came over IPv6."""
    controller = f"[{mesh.plan.core_ip6}]:15012"
    for node in ("node1", "node2"):
        dump = http_json(mesh, node, 15000, "/config_dump", host="127.0.0.1")
        assert dump["config"]["controller"] == controller
        assert {w["name"] for w in workloads(mesh, node)} >= {"client", "server", "local", "web"}
        connected = mesh.exec(node, ["ss", "-Htn", "state", "established", "dst", controller])
        assert connected.stdout.strip(), f"{node}'s agent has no established connection to {controller}"


def _enrolled(lab: Lab, node: str, ip: str) -> bool:
    return ip in capture_status(lab, node).get("enrolled", [])


def _echo_ok(lab: Lab, src: str, ip: str) -> bool:
    payload = os.urandom(4096)
    try:
        return tcp_echo(lab.pod(src).netns, ip, ECHO, payload, timeout=3) == payload
    except OSError:
        return False


def test_unenrolling_live_releases_the_ipv6_address_too(mesh: Lab) -> None:
    config = Path(mesh.config_dir) / "cluster.yaml"
    original = config.read_text()
    client6, server6 = _ip(mesh, CLIENT, "ip6"), _ip(mesh, SERVER, "ip6")
    assert _enrolled(mesh, "node1", client6)
    try:
        config.write_text(original.replace("istio.io/dataplane-mode: ambient", "istio.io/dataplane-mode: none"))
        wait_for(lambda: not _enrolled(mesh, "node1", client6), "demo's IPv6 addresses to be released from capture")
        wait_for(lambda: not _enrolled(mesh, "node2", server6), "the server's IPv6 address to be released")
        marker = b"V6-UNENROLLED-" + secrets.token_hex(8).encode()
        with sniff(mesh.plan.core_netns, mesh.node("node1").core_link) as wire:
            assert tcp_echo(mesh.pod(CLIENT).netns, server6, ECHO, marker) == marker
        assert wire.saw(marker), "an un-enrolled pod talks plaintext over IPv6, untouched by the mesh"
    finally:
        config.write_text(original)
    wait_for(lambda: _enrolled(mesh, "node1", client6), "the client's IPv6 address to be captured again")
    wait_for(lambda: _enrolled(mesh, "node2", server6), "the server's IPv6 address to be captured again")
    wait_for(lambda: _echo_ok(mesh, CLIENT, server6), "IPv6 traffic through the mesh again")


def test_agent_stopped_fails_closed_over_ipv6_and_restart_resumes(mesh: Lab) -> None:
    client6, server6 = _ip(mesh, CLIENT, "ip6"), _ip(mesh, SERVER, "ip6")

    def drops() -> float:
        return fail_closed_drops(mesh, "node1", client6)

    before = drops()
    mesh.stop("agent-node1")
    try:
        marker = b"V6-FAILCLOSED-" + secrets.token_hex(8).encode()
        with sniff(mesh.plan.core_netns, mesh.node("node1").core_link) as wire, pytest.raises(OSError):
            connect(mesh, CLIENT, server6, ECHO, timeout=2).sendall(marker)
        assert not wire.saw(marker)
        assert not any(dport == ECHO for _, dport, _ in wire.tcp_payloads()), "an IPv6 SYN left with no agent"
    finally:
        mesh.restart("agent-node1")
    wait_for(lambda: _echo_ok(mesh, CLIENT, server6), "the restarted agent to carry IPv6 traffic", timeout=60)
    wait_for(lambda: _enrolled(mesh, "node1", client6), "capture of the IPv6 address to be adopted")
    assert drops() > before, "the kernel must count the IPv6 fail-closed drop"


@pytest.mark.parametrize("family", FAMILIES)
def test_strict_denies_plaintext_from_a_non_mesh_pod_over_both_families(mesh: Lab, family: str) -> None:
    client_ip, caller = _ip(mesh, CLIENT, family), _ip(mesh, LEGACY, family)

    def denied() -> bool:
        try:
            who(mesh.pod(LEGACY).netns, client_ip, HTTP, timeout=3)
        except OSError:
            return True
        return False

    assert not denied()
    with config_file(mesh, "strict.yaml", STRICT_DEMO):
        wait_for(denied, f"STRICT to refuse plaintext over {family}")
        assert who(mesh.pod(SERVER).netns, client_ip, HTTP)["pod"] == "client", "mTLS callers still pass"
        records = _access(mesh, "node1", direction="inbound", path="plaintext", **{"policy.decision": "deny"})
        assert any(str(r["src.addr"]).startswith(_hostport(caller, 0)[:-1]) for r in records)
    wait_for(lambda: not denied(), "plaintext to pass again once STRICT is gone")
