"""The mesh on an IPv6-only lab: no IPv4 address on any lab link (only loopback keeps 127.0.0.1), so the control
plane, capture, HBONE and every path around it must work without an IPv4 fallback anywhere.

One lab for the module, built from YAML written here (IPv6-only ranges, addresses and VIPs).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from lab import Lab
from lab.client import who
from lab.observe import agent_log, http_json
from tests.support.mesh import connect, wait_for

ECHO, HTTP = 9000, 8080
CLIENT, SERVER, LOCAL, LEGACY = "demo/client", "demo/server", "demo/local", "legacy/web"


def _node(name: str, cidr: str) -> str:
    return f'apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDRs: ["{cidr}"]}}\n'


def _pod(ns: str, name: str, node: str, ip: str) -> str:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n"
        f'spec: {{nodeName: {node}, serviceAccountName: {name}}}\nstatus: {{podIPs: [{{ip: "{ip}"}}]}}\n'
    )


CLUSTER = [
    _node("node1", "fd00:10:244:1::/64"),
    _node("node2", "fd00:10:244:2::/64"),
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n",
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
    _pod("demo", "client", "node1", "fd00:10:244:1::10"),
    _pod("demo", "local", "node1", "fd00:10:244:1::11"),
    _pod("demo", "server", "node2", "fd00:10:244:2::10"),
    _pod("legacy", "web", "node2", "fd00:10:244:2::20"),
    "apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\n"
    'spec: {clusterIP: "fd00:10:96::10", ipFamilies: [IPv6], selector: {app: server},'
    " ports: [{name: http, port: 80, targetPort: 8080}]}\n",
]


@pytest.fixture(scope="module")
def mesh(require_root: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    config = tmp_path_factory.mktemp("ipv6only")
    (config / "cluster.yaml").write_text("\n---\n".join(CLUSTER))
    lab = Lab.up(config, name=f"ambit-v6-{secrets.token_hex(2)}", mesh=True)
    try:
        yield lab
    finally:
        lab.down()


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}"


def _access(lab: Lab, node: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        r for r in agent_log(lab, node) if r.get("scope") == "access" and all(r.get(k) == v for k, v in fields.items())
    ]


def test_no_ipv4_address_on_any_lab_link(mesh: Lab) -> None:
    targets = ["core", *mesh.nodes, *mesh.pods]
    for target in targets:
        v6 = mesh.exec(target, ["ip", "-6", "-o", "addr", "show", "scope", "global"]).stdout
        v4 = mesh.exec(target, ["ip", "-4", "-o", "addr", "show", "scope", "global"]).stdout
        assert v6.strip(), f"{target} has no global IPv6 address"
        assert not v4.strip(), f"{target} has an IPv4 address in an IPv6-only lab: {v4}"
    assert all(":" in p.ip and p.ip == p.ip6 for p in mesh.pods.values()), "a pod's primary address is not IPv6"


def test_cross_node_bytes_go_through_hbone_with_the_control_plane_over_ipv6(mesh: Lab) -> None:
    for node in ("node1", "node2"):
        dump = http_json(mesh, node, 15000, "/config_dump", host="127.0.0.1")
        assert dump["config"]["controller"] == _hostport(mesh.plan.core_ip, 15012)
    server, client = mesh.pod(SERVER).ip, mesh.pod(CLIENT).ip
    payload = os.urandom(1 << 20)
    with connect(mesh, CLIENT, server, ECHO) as sock:
        assert sock.family == socket.AF_INET6
        src = _hostport(client, sock.getsockname()[1])
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest(), "echo corrupted"
    wait_for(lambda: len(_access(mesh, "node1", **{"src.addr": src})) == 1, "node1's access record")
    (out,) = _access(mesh, "node1", **{"src.addr": src})
    assert (out["direction"], out["path"], out["security"]) == ("outbound", "hbone", "mutual_tls")
    assert out["dst.addr"] == _hostport(server, 15008)
    assert out["dst.identity"] == "spiffe://cluster.local/ns/demo/sa/server"
    assert (out["bytes_sent"], out["bytes_recv"]) == (len(payload), len(payload))


@pytest.mark.parametrize(
    ("src", "dst", "direction", "path", "keeps_caller"),
    [
        pytest.param(CLIENT, LOCAL, "outbound", "same_node", True, id="same-node"),
        pytest.param(LEGACY, CLIENT, "inbound", "plaintext", True, id="plaintext-into-mesh"),
        pytest.param(CLIENT, LEGACY, "outbound", "passthrough", False, id="passthrough"),
        pytest.param(CLIENT, "fd00:10:96::10", "outbound", "hbone", True, id="service-vip"),
    ],
)
def test_every_path_works_without_ipv4(
    mesh: Lab, src: str, dst: str, direction: str, path: str, keeps_caller: bool
) -> None:
    vip = ":" in dst
    dst_ip = dst if vip else mesh.pod(dst).ip
    # The record names the tunnel's address for HBONE (the endpoint's 15008), else the destination itself.
    logged = _hostport(mesh.pod(SERVER).ip, 15008) if vip else _hostport(dst_ip, HTTP)

    def records() -> int:
        return len(_access(mesh, "node1", direction=direction, path=path, **{"dst.addr": logged}))

    before = records()
    answer = who(mesh.pod(src).netns, dst_ip, 80 if vip else HTTP)
    assert answer["pod"] == ("server" if vip else mesh.pod(dst).name)
    if keeps_caller:
        assert answer["client"].rsplit(":", 1)[0] == mesh.pod(src).ip
    wait_for(lambda: records() == before + 1, f"node1's {direction} {path} record to {logged}")
