"""`ambitctl workloads | services | policies | config-dump` (DESIGN's command set) against an admin endpoint serving
what a real agent's /config_dump holds: the controller's translation of examples/basic and examples/policies (the lab's
default cluster and its policy), through the agent's store, in ztunnel's shape (agent.config_dump: `protocol`
HBONE/TCP, `status` Healthy, scopes and actions as ztunnel's RbacScope/RbacAction)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config_dump import ztunnel_dump
from agent.state import WorkloadStore
from cli import ambitctl
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.json_endpoint import serve_json

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def agent_dump() -> dict[str, Any]:
    objects = []
    for path in sorted((EXAMPLES / "basic").glob("*.yaml")) + sorted((EXAMPLES / "policies").glob("*.yaml")):
        result = parse_yaml_text(str(path), path.read_text())
        assert result.errors == []
        objects += result.objects
    translator = Translator()
    translator.apply(objects)
    store = WorkloadStore()
    store.put(list(translator.addresses().values()), list(translator.authorizations().values()))
    return {**ztunnel_dump(store), "certificates": []}


@pytest.fixture
def admin() -> Iterator[tuple[str, list[Any]]]:
    served: list[Any] = [agent_dump()]
    with serve_json("/config_dump", served) as address:
        yield address, served


def lines(capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    return [line.split() for line in capsys.readouterr().out.splitlines()]


def test_workloads_table(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert ambitctl.main(["workloads", "--admin", admin[0]]) == 0
    table = lines(capsys)
    assert table[0] == ["NAMESPACE", "NAME", "ADDRESS", "NODE", "TUNNEL", "IDENTITY", "STATUS"]
    rows = {row[1]: row for row in table[1:]}
    assert rows["client"] == [
        "demo",
        "client",
        "10.244.1.10",
        "node1",
        "HBONE",
        "spiffe://cluster.local/ns/demo/sa/client",
        "Healthy",
    ]
    assert rows["web"][:5] == ["legacy", "web", "10.244.2.20", "node2", "TCP"]  # namespace not enrolled


def test_namespace_filter_and_json(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert ambitctl.main(["workloads", "--admin", admin[0], "-n", "legacy", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(w["namespace"], w["name"]) for w in entries] == [("legacy", "web")]


def test_services_and_policies(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert ambitctl.main(["services", "--admin", admin[0]]) == 0
    rows = {row[1]: row for row in lines(capsys)[1:]}
    assert rows["server.demo.svc.cluster.local"] == [
        "demo",
        "server.demo.svc.cluster.local",
        "10.96.0.10",
        "80->8080,9000",
    ]
    assert ambitctl.main(["policies", "--admin", admin[0]]) == 0
    assert lines(capsys)[1:] == [["demo", "server-allow-client", "WorkloadSelector", "Allow", "1", "no"]]


def test_config_dump_is_the_whole_json(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    assert ambitctl.main(["config-dump", "--admin", admin[0]]) == 0
    assert json.loads(capsys.readouterr().out) == admin[1][0]


def test_unusable_answers_are_reported(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    address, served = admin
    served[0] = {"workloads": "nope"}
    assert ambitctl.main(["workloads", "--admin", address]) == 1
    assert "no list of workloads" in capsys.readouterr().err
    served[0] = ["not", "an", "object"]
    assert ambitctl.main(["config-dump", "--admin", address]) == 1
    assert "did not return an object" in capsys.readouterr().err
    assert ambitctl.main(["policies", "--admin", "127.0.0.1:9"]) == 1
    assert "ambitctl policies: agent admin 127.0.0.1:9" in capsys.readouterr().err
