"""The Kubernetes manifests must stay in step with the binaries they run: every flag they pass must parse, the
ports they probe and expose must be the ones the processes serve, and every kustomize resource must exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.main import AgentConfig
from common import flags
from controller.main import ControllerConfig

BASE = Path(__file__).resolve().parents[2] / "daemonset" / "base"


def _objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted(BASE.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _container(kind: str, name: str) -> dict[str, Any]:
    obj = next(o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name)
    containers: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    return containers[0]


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (BASE / resource).is_file(), resource


@pytest.mark.parametrize(
    ("kind", "name", "config", "binary"),
    [
        ("DaemonSet", "ambit-agent", AgentConfig, "ambit-agent"),
        ("Deployment", "ambit-controller", ControllerConfig, "ambit-controller"),
    ],
)
def test_container_args_parse_with_the_real_flags(kind: str, name: str, config: type, binary: str) -> None:
    c = _container(kind, name)
    assert c["command"] == [binary]
    flags.parse(config, c["args"])  # argparse exits (SystemExit) on an unknown or malformed flag


def test_agent_probe_and_ports_match_its_defaults() -> None:
    c = _container("DaemonSet", "ambit-agent")
    cfg = AgentConfig()
    assert c["readinessProbe"]["httpGet"]["port"] == cfg.ready_port
    assert {p["containerPort"] for p in c["ports"]} == {cfg.metrics_port, cfg.ready_port}


def test_agent_runs_privileged_on_the_host_network_with_bpffs() -> None:
    ds = next(o for o in _objects() if o["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["containers"][0]["securityContext"]["privileged"] is True
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert "/sys/fs/bpf" in mounts


def test_controller_may_read_every_kind_it_watches_and_review_tokens() -> None:
    role = next(o for o in _objects() if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "ambit-controller")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for needed in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("networking.istio.io", "serviceentries"),
        ("networking.istio.io", "workloadentries"),
        ("authentication.k8s.io", "tokenreviews"),
    ]:
        assert needed in granted, needed
