"""`ambit-agent --cleanup` as the uninstall DaemonSet runs it: in a node's network namespace, with the agent's
instance and state directory. Capture's own removal (filters, qdiscs, routing, pins) is tested with the redirect
module; this checks what the command adds: it refuses while an agent still runs with that state directory, the
saved xDS state goes too, and a second run finds nothing."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.xds import STATE_FILE
from lab import netns

AGENT = str(Path(sys.executable).parent / "ambit-agent")


@pytest.fixture
def node_netns(require_root: None) -> Iterator[str]:
    name = f"ambit-{secrets.token_hex(2)}"
    netns.add(name)
    try:
        yield name
    finally:
        netns.delete(name)


def _run_cleanup(ns: str, instance: str, state_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    argv = [AGENT, "--cleanup", f"--instance={instance}", f"--state-dir={state_dir}"]
    done = subprocess.run(netns.nsenter_argv(ns, argv), capture_output=True, text=True, timeout=60)
    return done.returncode, [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]


def _cleanup(ns: str, instance: str, state_dir: Path) -> list[Any]:
    code, lines = _run_cleanup(ns, instance, state_dir)
    assert code == 0, lines
    (record,) = [r for r in lines if r.get("msg") == "cleanup done"]
    assert record["instance"] == instance
    removed: list[Any] = record["removed"]
    return removed


def test_cleanup_removes_the_saved_state_and_its_directory(node_netns: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "ambit"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(b"saved by an agent")
    removed = _cleanup(node_netns, node_netns, state_dir)
    assert f"xDS state file {state_dir / STATE_FILE}" in removed, removed
    assert f"state directory {state_dir}" in removed, removed
    assert not state_dir.exists()
    assert _cleanup(node_netns, node_netns, state_dir) == [], "a second run must find nothing left"


def test_cleanup_keeps_a_state_directory_holding_other_files(node_netns: str, tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"saved by an agent")
    (tmp_path / "not-ours").write_text("someone else's")
    removed = _cleanup(node_netns, node_netns, tmp_path)
    assert removed == [f"xDS state file {tmp_path / STATE_FILE}"]
    assert (tmp_path / "not-ours").read_text() == "someone else's"


def test_cleanup_refuses_while_an_agent_runs_with_the_state_directory(node_netns: str, tmp_path: Path) -> None:
    """A draining agent's change watch puts back what the cleanup removes; the DaemonSet's init container must fail
    (and be retried) until the agent is gone. A real agent (no capture, no controller) in the test's netns."""
    state_dir = tmp_path / "ambit"
    log = tmp_path / "agent.log"
    argv = [AGENT, "--no-capture", "--node=n1", "--controller=127.0.0.1:1", f"--state-dir={state_dir}"]
    argv += ["--admin-port=0", "--metrics-port=0", "--ready-port=0", "--drain-seconds=0"]
    with open(log, "w") as out:
        agent = subprocess.Popen(netns.nsenter_argv(node_netns, argv), stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 30  # liveness bound for a loaded machine
        while '"agent started"' not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        code, lines = _run_cleanup(node_netns, node_netns, state_dir)
        assert code == 1 and [r["msg"] for r in lines if r.get("level") == "error"] == ["cleanup refused"], lines
        assert state_dir.is_dir(), "nothing may be removed under a running agent"
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    removed = _cleanup(node_netns, node_netns, state_dir)
    assert f"state directory {state_dir}" in removed, removed
    assert not state_dir.exists()


def test_cleanup_under_ip_netns_exec_says_the_pins_are_out_of_sight(node_netns: str, tmp_path: Path) -> None:
    """`ip netns exec` mounts a fresh /sys with no bpffs: the instance's pins (and the early-demux value they keep)
    cannot be seen, so cleanup cannot remove them. It said `cleanup done` as if there were none."""
    argv = [AGENT, "--cleanup", f"--instance={node_netns}", f"--state-dir={tmp_path / 'ambit'}"]
    done = subprocess.run(["ip", "netns", "exec", node_netns, *argv], capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert done.returncode == 0, lines
    (warning,) = [r for r in lines if r.get("msg", "").startswith("no bpffs here")]
    assert warning["level"] == "warning" and warning["instance"] == node_netns
    # nsenter keeps the host's /sys (and its bpffs): no such warning there
    assert not [r for r in _run_cleanup(node_netns, node_netns, tmp_path / "ambit")[1] if "bpffs" in r.get("msg", "")]
