"""The netns lab end to end: pod-to-pod traffic, coexisting labs, and teardown that leaves nothing behind, including
after crashes and failed `up`s."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from lab import Lab, LabConfigError, LabProcessError, client, cluster, mesh, netns
from lab.plan import LabPlan
from lab.state import STATE_FILE, state_dir

from .conftest import EXAMPLES, LabFactory

ROOT = Path(__file__).resolve().parents[2]


def _fresh_name() -> str:
    return f"ambit-{secrets.token_hex(2)}"


def _netns_identities(names: list[str]) -> set[tuple[int, int]]:
    ids = set()
    for name in names:
        st = os.stat(netns.path(name))
        ids.add((st.st_dev, st.st_ino))
    return ids


def _processes_in(identities: set[tuple[int, int]]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in identities:
            found.append(int(entry.name))
    return found


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _assert_gone(name: str, plan: LabPlan, identities: set[tuple[int, int]], pids: list[int]) -> None:
    assert netns.list_names(f"{name}-") == []
    assert not (state_dir(name) / STATE_FILE).exists()
    assert _processes_in(identities) == []
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    lab_links = {p.host_veth for p in plan.pods.values()} | {n.core_link for n in plan.nodes.values()}
    assert not lab_links & _root_links()


def test_pods_reach_each_other_across_nodes_and_on_the_same_node(basic_lab: Lab) -> None:
    lab = basic_lab
    caller = lab.pod("demo/client")
    cross, local = lab.pod("server-1"), lab.pod("server-2")
    assert cross.node != caller.node and local.node == caller.node

    for target in (cross, local, lab.pod("legacy/web")):
        answer = client.who(caller.netns, target.ip)
        assert answer["pod"] == target.name and answer["namespace"] == target.namespace
        assert answer["node"] == target.node
        assert answer["client"].split(":")[0] == caller.ip  # no NAT anywhere in the plain lab
        payload = secrets.token_bytes(200_000)
        assert client.tcp_echo(caller.netns, target.ip, cluster.WORKLOAD_ECHO_PORT, payload) == payload

    big = secrets.token_bytes(16 << 20)  # far beyond socket buffers: the echo helper must not deadlock
    assert client.tcp_echo(caller.netns, cross.ip, cluster.WORKLOAD_ECHO_PORT, big, timeout=30) == big

    # Nodes and the core netns (where the controller runs in mesh mode) reach pods too, from their own addresses.
    node = lab.node(cross.node)
    assert client.who(node.netns, cross.ip)["client"].split(":")[0] == node.ip
    assert client.who(lab.core_netns, caller.ip)["client"].split(":")[0] == lab.core_ip


def test_pod_wiring_matches_the_capture_topology(basic_lab: Lab) -> None:
    """The eBPF redirect relies on this shape: /32 pod address, default via the node, /32 host route per pod."""
    pod = basic_lab.pod("demo/client")
    node = basic_lab.node(pod.node)
    pod_addrs = basic_lab.exec(pod.name, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {pod.ip}/32" in pod_addrs
    assert basic_lab.exec(pod.name, ["ip", "route", "show", "default"]).stdout.startswith("default via 169.254.1.1")
    route = basic_lab.exec(node.name, ["ip", "route", "get", pod.ip]).stdout
    assert f"dev {pod.host_veth}" in route
    assert basic_lab.exec(node.name, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_two_labs_from_the_same_yaml_coexist(lab_factory: LabFactory) -> None:
    a, b = lab_factory(), lab_factory()
    assert not set(a.plan.netns_names) & set(b.plan.netns_names)
    assert a.pod("client").ip == b.pod("client").ip  # same YAML, same addresses, separate namespaces

    b.stop("workload-demo-server-1")
    with pytest.raises(ConnectionRefusedError):
        client.who(b.pod("client").netns, b.pod("server-1").ip)
    assert client.who(a.pod("client").netns, a.pod("server-1").ip)["pod"] == "server-1"

    b.down()
    assert netns.list_names(f"{b.name}-") == []
    assert client.who(a.pod("client").netns, a.pod("server-1").ip)["pod"] == "server-1"


def test_down_leaves_nothing_behind(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    extra = lab.spawn("node1", ["sleep", "300"], "sleeper")  # a user process started through the lab
    # as mesh mode does for each agent (<pin root>/<instance>), before anything is pinned
    pins = Path("/sys/fs/bpf") / f"{lab.name}-test-root" / "node1"
    lab.record_pin_dir(str(pins))
    pins.mkdir(parents=True)
    create_map = f"bpftool map create {pins / 'm'} type hash key 4 value 4 entries 1 name t"
    subprocess.run(create_map.split(), check=True)
    identities = _netns_identities(lab.plan.netns_names)
    pids = [r.pid for r, _ in lab.processes()]
    assert extra.pid in pids and all(alive for _, alive in lab.processes())

    lab.down()
    _assert_gone(lab.name, lab.plan, identities, pids)
    assert not pins.parent.exists(), "the pin root is removed once no lab's pins are left in it"


def test_down_after_crash_cleans_everything(lab_factory: LabFactory) -> None:
    """Workloads killed with SIGKILL plus an orphan nobody recorded: a fresh `down` from the state file removes all."""
    lab = lab_factory()
    pids = [r.pid for r, _ in lab.processes()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(p) for p in pids], timeout=5)
    orphan = subprocess.Popen(netns.nsenter_argv(lab.pod("client").netns, ["sleep", "300"]), start_new_session=True)
    identities = _netns_identities(lab.plan.netns_names)

    reloaded = Lab.load(lab.name)
    assert not any(alive for _, alive in reloaded.processes())
    reloaded.down()
    orphan.wait(timeout=5)
    _assert_gone(lab.name, lab.plan, identities, [*pids, orphan.pid])


def test_crash_in_the_middle_of_up_is_cleaned_by_down() -> None:
    """A process that dies (SIGKILL-like, no cleanup) after building the network leaves a lab `down` can remove."""
    name = _fresh_name()
    script = (
        "import os, sys\n"
        "from lab import cluster\n"
        "cluster.Lab._start_workloads = lambda self: os._exit(9)\n"
        f"cluster.Lab.up({str(EXAMPLES / 'basic')!r}, name={name!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    try:
        lab = Lab.load(name)
        assert lab.status()["phase"] == "creating"
        assert set(netns.list_names(f"{name}-")) == set(lab.plan.netns_names)
        identities = _netns_identities(lab.plan.netns_names)
    finally:
        subprocess.run([sys.executable, "-m", "cli.ambitctl", "lab", "down", "--name", name], cwd=ROOT, check=True)
    _assert_gone(name, lab.plan, identities, [])


def test_failed_up_cleans_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """A workload that cannot start fails `up` with its log, and nothing but that log is left."""
    name = _fresh_name()
    monkeypatch.setattr(cluster, "sys", SimpleNamespace(executable="/nonexistent/python3"))
    with pytest.raises(LabProcessError) as info:
        Lab.up(EXAMPLES / "basic", name=name)
    message = str(info.value)
    assert "exited during start" in message and "/nonexistent/python3" in message
    assert f"{state_dir(name)}/logs/" in message
    assert netns.list_names(f"{name}-") == []
    assert sorted(p.name for p in state_dir(name).iterdir()) == ["logs"]
    cluster.forget(name)
    assert not state_dir(name).exists()


def test_mesh_process_death_is_reported_with_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mesh plumbing only: a controller that exits names its log and last lines, and the lab is removed."""
    name = _fresh_name()
    die = "import sys; print('controller args:', sys.argv[1:]); sys.exit(3)"
    monkeypatch.setattr(mesh, "controller_argv", lambda *args: [sys.executable, "-c", die, *args])
    with pytest.raises(LabProcessError) as info:
        Lab.up(EXAMPLES / "basic", name=name, mesh=True)
    message = str(info.value)
    assert "controller exited before becoming ready" in message
    assert f"{state_dir(name)}/logs/controller.log" in message
    assert "node-tokens.json" in message  # the credentials file reached the controller's command line
    assert netns.list_names(f"{name}-") == []
    cluster.forget(name)


def test_invalid_config_creates_nothing(tmp_path: Path) -> None:
    name = _fresh_name()
    (tmp_path / "c.yaml").write_text(
        "kind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\n---\n"
        "kind: Pod\nmetadata: {name: p, namespace: demo}\nstatus: {podIP: 10.244.1.5}\n"
    )
    with pytest.raises(LabConfigError, match=r"c\.yaml:Pod/demo/p: spec\.nodeName: required"):
        Lab.up(tmp_path, name=name)
    assert netns.list_names(f"{name}-") == []
    assert not state_dir(name).exists()


def test_cli_up_status_exec_down() -> None:
    name = _fresh_name()
    ctl = [sys.executable, "-m", "cli.ambitctl", "lab"]
    up = subprocess.run([*ctl, "up", "--name", name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        status = subprocess.run([*ctl, "status", "--name", name], cwd=ROOT, capture_output=True, text=True, check=True)
        assert "demo/server-1" in status.stdout and "10.244.2.10" in status.stdout and "alive" in status.stdout
        ex = subprocess.run(
            [*ctl, "exec", "--name", name, "demo/client", "--", "curl", "-s", "http://10.244.2.10:8080/"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ex.returncode == 0 and '"client": "10.244.1.10:' in ex.stdout
        again = subprocess.run([*ctl, "up", "--name", name], cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 1 and "already exists" in again.stderr
    finally:
        down = subprocess.run([*ctl, "down", "--name", name], cwd=ROOT, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert netns.list_names(f"{name}-") == []


def test_reloaded_lab_sees_processes_spawned_elsewhere(basic_lab: Lab) -> None:
    """`Lab.load` in another process (ambitctl, a bench driver) and the creator share one record."""
    other = Lab.load(basic_lab.name)
    assert {r.name for r, alive in other.processes() if alive} == {r.name for r, _ in basic_lab.processes()}
    other.spawn("core", ["sleep", "300"], "from-other")
    basic_lab.spawn("node2", ["sleep", "300"], "from-creator")
    names = {r.name for r, alive in Lab.load(basic_lab.name).processes() if alive}
    assert {"from-other", "from-creator", "workload-demo-client"} <= names
    assert Lab.load(basic_lab.name).status()["phase"] == "up"
