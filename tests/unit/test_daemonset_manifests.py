"""The Kubernetes manifests, the image and the operator docs must stay in step with the binaries they describe.

Every flag and ``AMBIT_*`` variable the manifests pass must parse; the ports they probe and expose must be the ones
the processes serve with those flags; the files the flags name must be mounted; RBAC must grant exactly the API
calls the controller's code makes; the image must carry what the processes import and what the agent compiles; and
the flags, defaults, ports and metric names the docs name must exist. Each check reads the code, not a copy of it,
so a change on either side that leaves the other behind fails here.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import functools
import importlib.metadata
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from agent.admin import metrics_server, readiness_server
from agent.main import AgentConfig
from agent.metrics import Metrics
from agent.redirect import DEFAULT_SOURCE, RedirectConfig
from common import flags
from controller import ca_secret, node_auth
from controller.main import Controller, ControllerConfig
from controller.sources import kube

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "daemonset" / "base"
CLEANUP = REPO / "daemonset" / "cleanup"  # the uninstall helper: its own kustomization, never part of the base
DOCKERFILE = REPO / "daemonset" / "Dockerfile"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

AGENT = ("DaemonSet", "ambit-agent", AgentConfig, "ambit-agent")
CONTROLLER = ("Deployment", "ambit-controller", ControllerConfig, "ambit-controller")


# --- reading the manifests ----------------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    kust: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return kust


@functools.cache
def _objects() -> list[dict[str, Any]]:
    out = []
    for resource in _kustomization()["resources"]:
        out += [d for d in yaml.safe_load_all((BASE / resource).read_text()) if d]
    return out


def _object(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name} in {BASE}, found {len(matches)}"
    return matches[0]


def _pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _object(kind, name)["spec"]["template"]["spec"]
    return spec


def _container(kind: str, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = _pod_spec(kind, name)["containers"]
    assert len(containers) == 1, f"{kind}/{name}: one container expected"
    return containers[0]


def _config(kind: str, name: str, config: type, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The configuration the container's process starts with: its args over its env over the defaults."""
    c = _container(kind, name)
    for var in list(os.environ):
        if var.startswith("AMBIT_"):
            monkeypatch.delenv(var)
    for env in c.get("env", []):
        # A value from the downward API is only known on the node: any string stands for it.
        monkeypatch.setenv(env["name"], str(env.get("value", "from-the-downward-api")))
    return flags.parse(config, c["args"])


def _mounted(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volumeMount a file or directory of the container lies in (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []):
        mount = PurePosixPath(m["mountPath"])
        if (PurePosixPath(path) == mount or mount in PurePosixPath(path).parents) and (
            best is None or len(m["mountPath"]) > len(best["mountPath"])
        ):
            best = m
    return best


def _volume(kind: str, name: str, volume: str) -> dict[str, Any]:
    vols = [v for v in _pod_spec(kind, name).get("volumes", []) if v["name"] == volume]
    assert len(vols) == 1, f"{kind}/{name}: volume {volume!r} is mounted but not defined once"
    return vols[0]


def _ref(value: str) -> tuple[str, str]:
    namespace, _, name = value.partition("/")
    return namespace, name


# --- manifests against the flags ---------------------------------------------------------------------------------


def test_kustomization_lists_existing_files() -> None:
    for resource in _kustomization()["resources"]:
        assert (BASE / resource).is_file(), resource
    listed = set(_kustomization()["resources"])
    assert {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"} <= listed, "a manifest nobody installs"


@pytest.mark.parametrize(("kind", "name", "config", "binary"), [AGENT, CONTROLLER])
def test_container_args_and_env_are_real_flags(
    kind: str, name: str, config: type, binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _container(kind, name)
    assert c["command"] == [binary]
    fields = {f.name for f in dataclasses.fields(config)}
    for env in c.get("env", []):
        assert env["name"].startswith("AMBIT_"), f"{kind}/{name}: {env['name']} is no Ambit setting"
        assert env["name"][len("AMBIT_") :].lower() in fields, f"{kind}/{name}: {env['name']} names no flag"
    set_by_args = {a.split("=", 1)[0][2:].replace("-", "_") for a in c["args"]}
    set_by_env = {e["name"][len("AMBIT_") :].lower() for e in c.get("env", [])}
    assert not set_by_args & set_by_env, f"{kind}/{name}: set twice (the flag wins): {set_by_args & set_by_env}"
    _config(kind, name, config, monkeypatch)  # argparse exits (SystemExit) on an unknown or malformed flag


def test_agent_probe_and_ports_are_the_ones_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _container("DaemonSet", "ambit-agent")
    cfg = _config(*AGENT[:3], monkeypatch)
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == cfg.ready_port
    assert ("GET", probe["path"]) in readiness_server(lambda: (True, "")).routes
    assert {p["containerPort"] for p in c["ports"]} == {cfg.metrics_port, cfg.ready_port}


def test_controller_probe_ports_and_service_are_the_ones_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _container("Deployment", "ambit-controller")
    cfg = _config(*CONTROLLER[:3], monkeypatch)
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == cfg.monitoring_port
    assert ("GET", probe["path"]) in Controller(cfg).monitoring.routes
    serving = {cfg.xds_port, cfg.tls_port if cfg.ca_dir else 0, cfg.monitoring_port} - {0}
    assert {p["containerPort"] for p in c["ports"]} == serving
    svc = _object("Service", "ambit-controller")
    assert (
        svc["spec"]["selector"].items()
        <= _object("Deployment", "ambit-controller")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert {p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]} <= serving


def test_scrape_annotations_name_the_metrics_each_pod_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Annotation-based Prometheus (Istio's sample, kube-prometheus's pod job) scrapes only what the pod template
    announces: the agent's istio_tcp_* and the controller's metrics, on the ports and path they are served."""
    agent_cfg = _config(*AGENT[:3], monkeypatch)
    controller_cfg = _config(*CONTROLLER[:3], monkeypatch)
    served = {
        ("DaemonSet", "ambit-agent"): (agent_cfg.metrics_port, metrics_server(Metrics()).routes),
        ("Deployment", "ambit-controller"): (
            controller_cfg.monitoring_port,
            Controller(controller_cfg).monitoring.routes,
        ),
    }
    for (kind, name), (port, routes) in served.items():
        notes = _object(kind, name)["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", name
        assert notes.get("prometheus.io/port") == str(port), name
        assert ("GET", notes.get("prometheus.io/path")) in routes, name


def test_agent_reaches_the_controller_service_over_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = _config(*AGENT[:3], monkeypatch)
    controller = _config(*CONTROLLER[:3], monkeypatch)
    host, _, port = agent.controller.rpartition(":")
    assert host == f"ambit-controller.{_kustomization()['namespace']}.svc"
    assert int(port) in {p["port"] for p in _object("Service", "ambit-controller")["spec"]["ports"]}
    assert int(port) == controller.tls_port and controller.ca_dir, "the agent must dial the TLS port"
    assert agent.root_cert and agent.token_file, "TLS to the controller needs the root; the CA needs the token"
    assert agent.trust_domain == controller.trust_domain


@pytest.mark.parametrize(
    ("kind", "name", "config", "fields"),
    [
        (*AGENT[:3], ("root_cert", "token_file", "state_dir")),
        (*CONTROLLER[:3], ("ca_dir",)),
    ],
)
def test_paths_the_flags_name_are_mounted(
    kind: str, name: str, config: type, fields: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _container(kind, name)
    cfg = _config(kind, name, config, monkeypatch)
    for field in fields:
        path = getattr(cfg, field)
        assert path, f"{kind}/{name}: --{field.replace('_', '-')} is not set"
        mount = _mounted(c, path)
        assert mount is not None, f"{kind}/{name}: --{field.replace('_', '-')}={path} is in no volumeMount"
        _volume(kind, name, mount["name"])


def test_agent_credentials_are_what_the_controller_publishes_and_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = _config(*AGENT[:3], monkeypatch)
    controller = _config(*CONTROLLER[:3], monkeypatch)
    c = _container("DaemonSet", "ambit-agent")
    namespace = _kustomization()["namespace"]

    root = _volume("DaemonSet", "ambit-agent", _mounted(c, agent.root_cert)["name"])  # type: ignore[index]
    assert PurePosixPath(agent.root_cert).name == ca_secret.ROOT_CERT
    assert _ref(controller.root_configmap) == (namespace, root["configMap"]["name"])

    token = _volume("DaemonSet", "ambit-agent", _mounted(c, agent.token_file)["name"])  # type: ignore[index]
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == PurePosixPath(agent.token_file).name
    assert source["serviceAccountToken"]["audience"] == node_auth.TOKEN_AUDIENCE
    account = _pod_spec("DaemonSet", "ambit-agent")["serviceAccountName"]
    assert f"{namespace}/{account}" in node_auth.DEFAULT_TRUSTED_NODE_ACCOUNTS
    assert _ref(controller.ca_secret)[0] == namespace


def test_agent_runs_privileged_on_the_host_network_with_host_bpffs_and_state(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _pod_spec("DaemonSet", "ambit-agent")
    c = _container("DaemonSet", "ambit-agent")
    assert spec["hostNetwork"] is True
    assert c["securityContext"]["privileged"] is True
    bpffs = str(PurePosixPath(RedirectConfig().pin_root).parent)
    mount = _mounted(c, RedirectConfig().pin_root)
    assert mount is not None and mount["mountPath"] == bpffs
    assert mount.get("mountPropagation") == "Bidirectional"
    assert _volume("DaemonSet", "ambit-agent", mount["name"])["hostPath"]["path"] == bpffs
    state = _mounted(c, _config(*AGENT[:3], monkeypatch).state_dir)
    assert state is not None and "hostPath" in _volume("DaemonSet", "ambit-agent", state["name"])
    for headers in ("/lib/modules", "/usr/src"):  # BCC compiles against the node's kernel headers
        m = _mounted(c, headers)
        assert m is not None and m["mountPath"] == headers and m.get("readOnly") is True, headers
        assert _volume("DaemonSet", "ambit-agent", m["name"])["hostPath"]["path"] == headers


def test_agent_sees_the_pods_network_namespaces_where_its_flags_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """agent/inpod.py connects from inside a pod's namespace, found in --pod-netns-dirs: the directory the runtime
    keeps them in must be the host's (hostPath), and propagate the mounts of pods started later (HostToContainer;
    without it the agent sees only the pods that existed when it started)."""
    c = _container("DaemonSet", "ambit-agent")
    dirs = [d for d in _config(*AGENT[:3], monkeypatch).pod_netns_dirs.split(",") if d]
    mounted = [(d, _mounted(c, d)) for d in dirs]
    found = [(d, m) for d, m in mounted if m is not None and m["mountPath"] == d]
    assert found, f"none of --pod-netns-dirs {dirs} is mounted"
    for d, m in found:
        assert m.get("mountPropagation") == "HostToContainer", d
        assert _volume("DaemonSet", "ambit-agent", m["name"])["hostPath"]["path"] == d


def test_agent_grace_period_covers_its_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(*AGENT[:3], monkeypatch)
    assert _pod_spec("DaemonSet", "ambit-agent")["terminationGracePeriodSeconds"] > cfg.drain_seconds


# --- what a real cluster asks of the pods ---------------------------------------------------------------------------


async def _http_status(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return (await reader.readline()).split(b" ")[1]
    finally:
        writer.close()


async def test_controller_probe_answers_on_both_families(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet probes the pod's IP, and on an IPv6-only or IPv6-first cluster that is an IPv6 address: the
    monitoring listener (which serves the readiness probe) must take IPv6 as well as IPv4, or the controller is
    never Ready and its Service has no endpoint for the agents. The default address is `::` where the kernel has
    IPv6 (it was 0.0.0.0); gRPC binds both families for any wildcard."""
    cfg = _config(*CONTROLLER[:3], monkeypatch)
    server = Controller(cfg).monitoring
    await server.start(cfg.bind_address(), 0)
    try:
        for host in ("::1", "127.0.0.1"):
            assert await _http_status(host, server.port) == b"503", host  # not ready: nothing synced here
    finally:
        assert server.server is not None
        server.server.close()
        await server.server.wait_closed()


def _every_pod_spec() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "DaemonSet/ambit-agent", _pod_spec("DaemonSet", "ambit-agent")
    yield "Deployment/ambit-controller", _pod_spec("Deployment", "ambit-controller")
    yield "DaemonSet/ambit-cleanup", _cleanup_daemonset()["spec"]["template"]["spec"]


def test_pods_run_on_linux_nodes_only() -> None:
    """The image is a Linux one, and the DaemonSets tolerate every taint, the one on Windows nodes included:
    without the selector a mixed cluster schedules an agent on each Windows node, where it never starts."""
    for where, spec in _every_pod_spec():
        assert spec.get("nodeSelector", {}).get("kubernetes.io/os") == "linux", where


def test_namespace_admits_the_privileged_pods_it_holds() -> None:
    """Pod Security Admission judges pods by their namespace's level; a cluster whose default is baseline or
    restricted refuses privileged, host-network, hostPath pods, so the agent's namespace must say privileged."""
    (ns,) = [o for o in _objects() if o["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == _kustomization()["namespace"]
    spec = _pod_spec("DaemonSet", "ambit-agent")
    assert spec["hostNetwork"] and any("hostPath" in v for v in spec["volumes"])
    assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "privileged"


def test_controller_meets_the_restricted_pod_security_standard() -> None:
    """The controller holds the CA key and talks to the API: it needs nothing the restricted standard removes."""
    spec = _pod_spec("Deployment", "ambit-controller")
    sc = {**spec.get("securityContext", {}), **_container("Deployment", "ambit-controller")["securityContext"]}
    assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0
    assert sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities") == {"drop": ["ALL"]}
    assert sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    assert not spec.get("hostNetwork") and not any("hostPath" in v for v in spec.get("volumes", []))


def test_agent_pod_carries_no_api_credentials() -> None:
    """The agent reads nothing from the API (it authenticates to the controller with its projected istio-ca
    token), so the default service-account token, valid for the API server, stays out of a privileged pod."""
    for path in sorted((REPO / "agent").rglob("*.py")):
        assert not re.search(r"^\s*(import|from)\s+kubernetes\b", path.read_text(), re.M), path.name
    assert _pod_spec("DaemonSet", "ambit-agent").get("automountServiceAccountToken") is False


_MIB = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "": 1 / (1024 * 1024)}

# Measured (BCC 0.26, kernel 6.18): the loader child compiling bpf/redirect.bpf.c peaks at 150 MB RSS, beside an
# agent of 57-60 MB with 100 local workloads (bench/agent_memory.py), so an agent starting on a busy node needs
# about 210 MB for those seconds.
AGENT_START_PEAK_MIB = 150 + 60


def _mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([KMG]i)?", quantity).groups()  # type: ignore[union-attr]
    return float(number) * _MIB[unit or ""]


def test_agent_memory_request_and_limit_fit_what_it_uses() -> None:
    """The request covers the start (compile) peak, so the scheduler does not overcommit the node by it; a limit,
    if any, must not kill the agent below its relay budget: an OOM-killed agent leaves its pods failing closed."""
    from agent.tunnel import BUFFERS

    resources = _container("DaemonSet", "ambit-agent")["resources"]
    assert _mib(resources["requests"]["memory"]) >= AGENT_START_PEAK_MIB
    limit = resources.get("limits", {}).get("memory")
    assert limit is None or _mib(limit) > AGENT_START_PEAK_MIB + BUFFERS.budget / 2**20


# --- the uninstall DaemonSet against the agent it cleans up after ---------------------------------------------------


def _cleanup_kustomization() -> dict[str, Any]:
    kust: dict[str, Any] = yaml.safe_load((CLEANUP / "kustomization.yaml").read_text())
    return kust


def _cleanup_daemonset() -> dict[str, Any]:
    kust = _cleanup_kustomization()
    objects = [d for r in kust["resources"] for d in yaml.safe_load_all((CLEANUP / r).read_text()) if d]
    (ds,) = [o for o in objects if o["kind"] == "DaemonSet"]
    assert ds["metadata"]["name"] == "ambit-cleanup"
    return ds


def _cleanup_container() -> dict[str, Any]:
    (init,) = _cleanup_daemonset()["spec"]["template"]["spec"]["initContainers"]
    return dict(init)


def _host_path(spec: dict[str, Any], container: dict[str, Any], path: str) -> PurePosixPath:
    """Where ``path`` inside the container is on the node, through its hostPath volume."""
    mount = _mounted(container, path)
    assert mount is not None, f"{container['name']}: {path} is in no volumeMount"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "hostPath" in volume, f"{container['name']}: {path} is not on the node"
    inside = PurePosixPath(path).relative_to(mount["mountPath"])
    return PurePosixPath(volume["hostPath"]["path"]) / inside


def test_cleanup_kustomization_matches_the_base() -> None:
    kust = _cleanup_kustomization()
    for resource in kust["resources"]:
        assert (CLEANUP / resource).is_file(), resource
    assert {p.name for p in CLEANUP.glob("*.yaml")} - {"kustomization.yaml"} <= set(kust["resources"])
    assert kust["namespace"] == _kustomization()["namespace"]
    assert kust["images"] == _kustomization()["images"], "the cleanup must run the agent version that installed"


def test_cleanup_runs_the_agents_cleanup_with_real_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _cleanup_container()
    assert c["command"] == [AGENT[3]]
    for var in list(os.environ):
        if var.startswith("AMBIT_"):
            monkeypatch.delenv(var)
    for env in c.get("env", []):
        assert env["name"].startswith("AMBIT_") and env["name"][len("AMBIT_") :].lower() in {
            f.name for f in dataclasses.fields(AgentConfig)
        }, env["name"]
        monkeypatch.setenv(env["name"], str(env["value"]))
    cleanup = flags.parse(AgentConfig, c["args"])  # argparse exits on an unknown or malformed flag
    assert cleanup.cleanup is True
    agent = _config(*AGENT[:3], monkeypatch)
    assert cleanup.instance == agent.instance, "--cleanup removes one capture instance: the agent's"


def test_cleanup_reaches_what_the_agent_left_on_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same scheduling, the node's network namespace, privileges for netlink and the sysctl, and the agent's pin
    directory and state directory at the same places on the node."""
    ds_spec = _cleanup_daemonset()["spec"]["template"]["spec"]
    agent_spec = _pod_spec("DaemonSet", "ambit-agent")
    c, agent_c = _cleanup_container(), _container("DaemonSet", "ambit-agent")
    assert ds_spec["hostNetwork"] is True and c["securityContext"]["privileged"] is True
    for key in ("tolerations", "nodeSelector", "affinity"):
        assert ds_spec.get(key) == agent_spec.get(key), f"the cleanup must run wherever the agent ran ({key})"
    pins = RedirectConfig().pin_root
    assert _host_path(ds_spec, c, pins) == _host_path(agent_spec, agent_c, pins)
    for var in list(os.environ):
        if var.startswith("AMBIT_"):
            monkeypatch.delenv(var)
    cleanup = flags.parse(AgentConfig, c["args"])
    agent = _config(*AGENT[:3], monkeypatch)
    cleaned = _host_path(ds_spec, c, cleanup.state_dir)
    assert cleaned == _host_path(agent_spec, agent_c, agent.state_dir), "the saved state must be the agent's"
    assert _mounted(c, cleanup.state_dir)["mountPath"] != cleanup.state_dir, "a mount point cannot be removed"  # type: ignore[index]


# --- RBAC against the API calls in the code -----------------------------------------------------------------------

_VERBS = {"read": "get", "list": "list", "create": "create", "replace": "update", "patch": "patch", "delete": "delete"}
_METHOD = re.compile(r"^(read|list|create|replace|patch|delete)_(?:namespaced_)?([a-z_]+?)(?:_for_all_namespaces)?$")


def _api_groups() -> dict[type, str]:
    from kubernetes import client

    return {client.CoreV1Api: "", client.AuthenticationV1Api: "authentication.k8s.io"}


def _plural(snake: str) -> str:
    word = snake.replace("_", "")
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def _code_api_calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every typed Kubernetes client method the controller's code names, plus list and
    watch of every resource the kube source follows (through the generic custom-objects API too), CRDs included."""
    from kubernetes import client

    needed = {(r.group, r.plural, verb) for r in (*kube.RESOURCES, kube.CRDS) for verb in ("list", "watch")}
    trees = [ast.parse(path.read_text()) for path in sorted((REPO / "controller").rglob("*.py"))]
    used = {
        node.func.attr
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("Api")
    }
    apis = {getattr(client, name) for name in used if name != "CustomObjectsApi"}  # generic: kube.RESOURCES
    unknown = {api.__name__ for api in apis} - {api.__name__ for api in _api_groups()}
    assert not unknown, f"the controller uses {unknown}: add their API groups to _api_groups"
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (m := _METHOD.match(node.attr)):
                for api in apis:
                    if hasattr(api, node.attr):
                        needed.add((_api_groups()[api], _plural(m.group(2)), _VERBS[m.group(1)]))
    return needed


def _grants(kind: str, name: str) -> set[tuple[str, str, str]]:
    rules = _object(kind, name)["rules"]
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_controller_rbac_grants_exactly_the_calls_its_code_makes() -> None:
    needed = _code_api_calls()
    granted = _grants("ClusterRole", "ambit-controller") | _grants("Role", "ambit-controller-ca")
    assert needed - granted == set(), "the controller calls these without a grant"
    assert granted - needed == set(), "granted but never called"


def test_controller_ca_role_is_limited_to_its_secret_and_configmap(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(*CONTROLLER[:3], monkeypatch)
    names = {"secrets": _ref(cfg.ca_secret)[1], "configmaps": _ref(cfg.root_configmap)[1]}
    for rule in _object("Role", "ambit-controller-ca")["rules"]:
        for resource in rule["resources"]:
            if rule["verbs"] == ["create"]:
                assert "resourceNames" not in rule  # create cannot be limited by name
            else:
                assert rule.get("resourceNames") == [names[resource]], rule
    account = _pod_spec("Deployment", "ambit-controller")["serviceAccountName"]
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = next(o for o in _objects() if o["kind"] == kind)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": _kustomization()["namespace"]}
        ]


# --- the image against what the processes import and compile ------------------------------------------------------

RUNTIME_PACKAGES = ("agent", "controller", "common", "api", "waypoint")


def _dockerfile_lines() -> list[str]:
    return DOCKERFILE.read_text().replace("\\\n", " ").splitlines()


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _dependency_closure(names: set[str]) -> set[str]:
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for another platform (its marker), not installed here
        for req in requires:
            if "extra ==" not in req:
                todo.append(_requirement_name(req))
    return seen


def _third_party_imports() -> Iterator[tuple[Path, str]]:
    local = {p.name for p in REPO.iterdir() if p.is_dir()}
    for package in RUNTIME_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "api" / "build.py":
                continue  # `make proto`'s generator: grpc_tools is a dev dependency, never run in the image
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    tops = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top not in sys.stdlib_module_names and top not in local:
                        yield path, top


def test_image_installs_every_package_the_processes_import() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {_requirement_name(r) for r in pyproject["project"]["dependencies"]}
    installed = _dependency_closure(declared)
    apt = " ".join(line for line in _dockerfile_lines() if "apt-get install" in line).split()
    providers = importlib.metadata.packages_distributions()
    for path, top in _third_party_imports():
        if top == "bcc":  # Debian's python3-bpfcc: not on PyPI
            assert "python3-bpfcc" in apt, f"{path.name} imports bcc"
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
        assert dists & installed, f"{path.relative_to(REPO)} imports {top}, which no declared dependency installs"


def test_image_copies_the_packages_and_the_ebpf_source_it_compiles() -> None:
    copied = {line.split()[-1].strip("/") for line in _dockerfile_lines() if line.startswith("COPY ")}
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in include["include"]:
        assert package.rstrip("*") in copied, f"pyproject's package {package} is not copied into the image"
    source = DEFAULT_SOURCE.relative_to(REPO)
    assert source.parts[0] in copied, f"the agent compiles {source} at start"
    # agent/redirect.py finds bpf/ beside its own package: only an in-place install keeps them side by side.
    installs = [line for line in _dockerfile_lines() if "pip install" in line]
    (in_place,) = [line for line in installs if re.search(r"pip install [^&]*-e \.", line)]
    # Anything installed before is the project's own dependency list: daemonset/requirements.lock, passed through a
    # stage that checks it against pyproject.toml (a layer of its own, keyed on the lock alone).
    for line in installs:
        assert line is in_place or "-r /tmp/requirements.txt" in line, line
    (written,) = [line for line in _dockerfile_lines() if "> /tmp/requirements.txt" in line]
    assert '["project"]["dependencies"]' in written, written


def test_image_can_unpack_the_kernels_own_headers() -> None:
    """Where a node has no kernel headers on disk, BCC (src/cc/frontends/clang/kbuild_helper.cc, 0.26 as later)
    runs ``modprobe kheaders`` and ``tar -xf /sys/kernel/kheaders.tar.xz``; the slim base has tar but neither
    modprobe nor xz, so without these the fallback fails and the agent reports capture unavailable."""
    apt = " ".join(line for line in _dockerfile_lines() if "apt-get install" in line).split()
    assert {"kmod", "xz-utils"} <= set(apt)


# --- the docs against the flags, ports and metrics ----------------------------------------------------------------


def _doc_section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _table_rows(section: str) -> Iterator[list[str]]:
    for line in section.splitlines():
        if line.startswith("| `--"):
            yield [cell.strip() for cell in line.strip("|").split("|")]


def _doc_default_matches(value: Any, doc: str) -> bool:
    doc = doc.strip()
    if isinstance(value, bool):
        return doc in (("on",) if value else ("off", "—"))
    if isinstance(value, int | float):
        return re.fullmatch(r"[0-9.]+( s)?", doc) is not None and float(doc.removesuffix(" s")) == value
    return doc == value


@pytest.mark.parametrize(
    ("heading", "config"), [("`ambit-agent`", AgentConfig), ("`ambit-controller`", ControllerConfig)]
)
def test_configuration_reference_names_every_flag_with_its_default(heading: str, config: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(config)}
    documented: set[str] = set()
    for cells in _table_rows(_doc_section(REPO / "docs" / "configuration.md", heading)):
        names = list(dict.fromkeys(n.replace("-", "_") for n in re.findall(r"`--(?:no-)?([a-z][a-z-]*)", cells[0])))
        defaults = re.split(r",\s*|\s+/\s+", cells[1])
        for name in names:
            assert name in fields, f"docs/configuration.md {heading}: --{name.replace('_', '-')} is no flag"
        documented |= set(names)
        if len(defaults) != len(names):
            continue  # one shared prose default ("—", "on") for several flags
        for name, doc in zip(names, defaults, strict=True):
            f = fields[name]
            if f.default is dataclasses.MISSING or f.default == "":
                continue  # computed at start (the hostname), or none and said in words ("—", "in-cluster")
            assert _doc_default_matches(f.default, doc), f"{heading} --{name}: documented {doc!r}, is {f.default!r}"
    assert set(fields) - documented == set(), f"docs/configuration.md {heading}: undocumented flags"


@pytest.mark.parametrize("config", [AgentConfig, ControllerConfig])
def test_help_names_every_flag(config: type, capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` renders every flag's text through argparse's %-formatting: a bare % in a help text (\"~10%\")
    made `ambit-agent --help` a TypeError traceback (the image check caught it)."""
    with pytest.raises(SystemExit) as done:
        flags.parse(config, ["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(config):
        assert f"--{f.name.replace('_', '-')}" in out, f.name


def test_docs_name_only_real_ambit_variables() -> None:
    fields = {f.name for c in (AgentConfig, ControllerConfig) for f in dataclasses.fields(c)}
    # and the variables the repository's shell scripts read (the image build's, scripts/build-image.sh)
    for script in (REPO / "scripts").glob("*.sh"):
        fields |= {v.lower() for v in re.findall(r"\$\{?AMBIT_([A-Z_]+[A-Z])", script.read_text())}
    for path in DOCS:
        for var in re.findall(r"AMBIT_([A-Z_]+[A-Z])", path.read_text()):
            if var != "FLAG":  # the pattern's placeholder, AMBIT_<FLAG>
                assert var.lower() in fields, f"{path.name}: AMBIT_{var} names no flag"


def test_architecture_port_table_matches_the_defaults() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `ambit-")}
    for process, config in (("`ambit-agent`", AgentConfig), ("`ambit-controller`", ControllerConfig)):
        ports = {f.default for f in dataclasses.fields(config) if f.name.endswith("_port")}
        assert {int(p) for p in re.findall(r"\b(1[0-9]{4})\b", rows[process])} == ports, process


def _code_metric_names() -> set[str]:
    names: set[str] = set()
    for package in ("agent", "controller"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(re.findall(r"[\"']((?:istio|ambit|pilot|citadel)_[a-z0-9_]+)[\"']", path.read_text()))
    return names


def test_docs_name_only_metrics_the_code_exports() -> None:
    code = _code_metric_names()
    for path in DOCS:
        for name in set(re.findall(r"`((?:istio|ambit)_[a-z0-9_]+[a-z0-9])(?:\{[^`]*)?`", path.read_text())):
            base = name.removesuffix("_total")
            assert name in code or base in code, f"{path.name}: metric {name} is exported by no code"


def _code_metric_labels() -> dict[str, set[str]]:
    """Label names of the metrics whose name and labels the code writes as literals (others are not checked)."""
    out: dict[str, set[str]] = {}
    for package in ("agent", "controller"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                    continue
                name = node.args[0].value
                if not (isinstance(name, str) and re.fullmatch(r"(istio|ambit|pilot|citadel)_[a-z0-9_]+", name)):
                    continue
                given = [k.value for k in node.keywords if k.arg in ("labels", "labelnames")] + node.args[2:3]
                for value in given:
                    if isinstance(value, ast.List | ast.Tuple):
                        names = [e.value for e in value.elts if isinstance(e, ast.Constant)]
                        if len(names) == len(value.elts) and all(isinstance(n, str) for n in names):
                            out[name] = {str(n) for n in names}
    return out


def test_docs_name_only_labels_the_metrics_carry() -> None:
    labels = _code_metric_labels()
    assert "ambit_capture_events" in labels, "the label scan found nothing: has the metrics code changed shape?"
    for path in DOCS:
        for name, inside in re.findall(r"`((?:istio|ambit)_[a-z0-9_]+)\{([^}`]*)\}", path.read_text()):
            known = labels.get(name, labels.get(name.removesuffix("_total")))
            if known is None:
                continue
            documented = {part.split("=")[0].strip() for part in inside.split(",")}
            assert documented <= known, f"{path.name}: {name} has labels {sorted(known)}, not {sorted(documented)}"


def test_readme_module_map_names_modules_that_exist() -> None:
    section = _doc_section(REPO / "README.md", "Architecture in brief")
    bullets = re.findall(r"^- `([a-z]+)/`:(.*?)(?=^- |\Z)", section, flags=re.M | re.S)
    assert bullets, "README's module map has no `dir/:` bullets"
    for directory, text in bullets:
        assert (REPO / directory).is_dir(), directory
        for module in re.findall(r"`([a-z_]+\.py)`", text):
            assert (REPO / directory / module).is_file(), f"README names {directory}/{module}, which does not exist"
        for sub in re.findall(r"`([a-z_]+)/`", text):
            assert (REPO / directory / sub).is_dir(), f"README names {directory}/{sub}/, which does not exist"


def test_docs_paths_and_links_exist() -> None:
    for path in DOCS:
        text = path.read_text()
        for ref in re.findall(
            r"`((?:agent|controller|common|api|lab|bench|cli|bpf|tests|daemonset|scripts)/[\w./-]+)", text
        ):
            file = ref.split("::")[0].rstrip(".")
            if file.endswith("/"):
                continue  # a directory the code creates (bench/results/), not in a fresh clone
            assert (REPO / file).exists(), f"{path.name} names {file}, which does not exist"
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link:
                assert (path.parent / link).exists(), f"{path.name} links to {link}, which does not exist"
