"""A running agent's /config_dump, read as `istioctl ztunnel-config all` reads it (tests/support/istioctl_decode.py,
after istio/istio istioctl/pkg/writer/ztunnel/configdump/configdump.go Prime, lines 54-94, and the summary writers
of workload.go, services.go, policies.go and certificates.go): the lab's examples/basic with examples/policies, the
controller's translation through xDS into node1's agent, its certificates, and `ambitctl` reading the same dump.
The unit tests (tests/unit/test_istioctl_dump.py) pin each field; this one pins the agent's wiring: its sections do
not collide with istioctl's keys, its trust domain fills the workloads, and its certificates are listed."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import ambitctl
from lab import Lab
from lab.observe import http_json
from tests.support import istioctl_decode as istioctl
from tests.support.mesh import connect, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def mesh(require_root: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    config = tmp_path_factory.mktemp("istioctl-lab")
    for path in [*(EXAMPLES / "basic").glob("*.yaml"), *(EXAMPLES / "policies").glob("*.yaml")]:
        shutil.copy(path, config / path.name)
    lab = Lab.up(config, name=f"ambit-ictl-{secrets.token_hex(2)}", mesh=True)
    try:
        yield lab
    finally:
        lab.down()


def test_istioctl_reads_a_running_agents_dump(mesh: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    def dump() -> dict[str, object]:
        return dict(http_json(mesh, "node1", 15000, "/config_dump", host="127.0.0.1"))

    wait_for(lambda: len(istioctl.prime(dump())["certificates"]) == 2, "node1's two enrolled pods' certificates")
    raw = dump()
    z = istioctl.prime(raw)
    assert {"connections", "pool", "capture", "config"} <= set(raw), "Ambit's own sections are kept"
    ip = {name: mesh.pod(name).ip for name in ("demo/client", "demo/server-1", "demo/server-2", "legacy/web")}
    assert istioctl.workload_rows(z) == [
        ["demo", "client", ip["demo/client"], "node1", "None", "HBONE"],
        ["demo", "server-1", ip["demo/server-1"], "node2", "None", "HBONE"],
        ["demo", "server-2", ip["demo/server-2"], "node1", "None", "HBONE"],
        ["legacy", "web", ip["legacy/web"], "node2", "None", "TCP"],
    ]
    assert {w["trustDomain"] for w in z["workloads"]} == {"cluster.local"}
    assert istioctl.service_rows(z) == [
        ["demo", "server", "10.96.0.10", "None", "2/2"],
        ["legacy", "web", "10.96.0.20", "None", "1/1"],
    ]
    assert istioctl.policy_rows(z) == [["demo", "server-allow-client", "Allow", "WorkloadSelector"]]
    identities = {r[0]: r for r in istioctl.secret_rows(z) if r[1] == "Leaf"}
    assert set(identities) == {"spiffe://cluster.local/ns/demo/sa/client", "spiffe://cluster.local/ns/demo/sa/server"}
    assert all(r[2] == "Available" for r in identities.values())

    assert ambitctl.main(["workloads", "--lab", mesh.name, "--node", "node1", "-n", "demo"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[1], r[4], r[6]) for r in rows] == [
        ("client", "HBONE", "Healthy"),
        ("server-1", "HBONE", "Healthy"),
        ("server-2", "HBONE", "Healthy"),
    ]


def test_istioctl_lists_the_connections_the_agent_tracks(mesh: Lab) -> None:
    """`istioctl ztunnel-config connections` reads `workloadState`: node1's captured workloads, each with the
    connections the agent authorized as their destination and those it carries as their source (a held same-node
    one here: inbound for server-2, outbound for the client)."""
    with connect(mesh, "demo/client", mesh.pod("demo/server-2").ip, 9000) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        port = held.getsockname()[1]
        z = istioctl.prime(dict(http_json(mesh, "node1", 15000, "/config_dump", host="127.0.0.1")))
    names = {f"{s['info']['name']}.{s['info']['namespace']}": s["state"] for s in z["workloadState"].values()}
    assert names == {"client.demo": "Up", "server-2.demo": "Up"}, "node1's captured workloads"
    rows = istioctl.connection_rows(z)
    assert [(r[0], r[1], r[2].rpartition(":")[2], r[3].partition(":")[0], r[5]) for r in rows] == [
        ("client.demo", "Outbound", str(port), "server-2.demo", "HBONE"),
        ("server-2.demo", "Inbound", "9000", "client.demo", "HBONE"),
    ]
    assert rows[0][4] == "server-2.demo:9000", "what the client dialled"
