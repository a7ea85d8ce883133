"""Mesh mode: per-node credentials, the controller in the core netns and one agent per node netns.

The command lines are the only part that knows the binaries' flags (``controller_argv`` / ``agent_argv``); the
rest is plumbing: write credentials, spawn through the lab, and wait for each health endpoint while watching the
process, so a crash surfaces at once with its log file and last lines instead of as a timeout.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lab import client
from lab.errors import LabConfigError, LabProcessError
from lab.processes import is_alive, log_tail
from lab.state import ProcessRecord

if TYPE_CHECKING:
    from lab.cluster import Lab

XDS_TLS_PORT = 15012
MONITORING_PORT = 15014
AGENT_READY_PORT = 15021
READY_PATH = "/healthz/ready"
READY_TIMEOUT = 60.0
PIN_ROOT = "/sys/fs/bpf/ambit"  # agent.redirect's default pin root
DRAIN_SECONDS = 5.0  # the agent's own --drain-seconds default
# SIGTERM to SIGKILL for an agent: its drain, then the rest of its shutdown (pool, controller channel, netlink).
STOP_MARGIN = 5.0


def drain_seconds(value: float | None = None) -> float:
    """The agents' drain time: ``value``, else ``AMBIT_DRAIN_SECONDS`` (which the agents would read themselves, so
    the lab must wait as long), else the agent's default."""
    raw: float | str
    if value is not None:
        source, raw = "drain_seconds", value
    else:
        source, raw = "AMBIT_DRAIN_SECONDS", os.environ.get("AMBIT_DRAIN_SECONDS", DRAIN_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise LabConfigError([f"{source}: the agents' drain time must be a number of seconds >= 0, got {raw!r}"])
    return seconds


def _binary(name: str) -> str:
    """Prefer the console script next to the running interpreter (the project venv), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise LabProcessError(f"{name} is not installed (expected {local}); run `make setup`")
    return found


def controller_argv(config_dir: str, ca_dir: str, tokens_file: str, listen_address: str = "0.0.0.0") -> list[str]:
    return [
        _binary("ambit-controller"),
        "--config-dir",
        config_dir,
        "--ca-dir",
        ca_dir,
        "--node-tokens",
        tokens_file,
        "--listen-address",
        listen_address,
    ]


def agent_argv(
    node: str,
    controller: str,
    state_dir: str,
    token_file: str,
    root_cert: str,
    uplink: str,
    instance: str,
    drain: float = DRAIN_SECONDS,
    listen_address: str = "0.0.0.0",
    pod_netns_prefix: str | None = None,
    in_pod_hbone: bool = False,
) -> list[str]:
    """Agents talk to the controller over TLS (15012), verifying it against the root the CA wrote on first start,
    and authenticate with their node token, as they would in a cluster with a service-account token. The drain time
    is passed explicitly: the lab waits that long when it stops an agent. A dual-stack lab's agents listen on
    ``::`` (one socket per port for both families). The lab's pods are named netns (``ip netns``): with
    ``pod_netns_prefix`` (the lab's own) the agents connect from inside them, and never from another lab's pod of
    the same address; None keeps them out of every pod's (the agent's default would look at every lab's)."""
    pod_netns = ["--pod-netns-dirs", "/run/netns" if pod_netns_prefix is not None else ""]
    if pod_netns_prefix is not None:
        pod_netns += ["--pod-netns-prefix", pod_netns_prefix]
    if in_pod_hbone:
        pod_netns.append("--in-pod-hbone")
    return [
        _binary("ambit-agent"),
        "--node",
        node,
        "--controller",
        controller,
        "--state-dir",
        state_dir,
        "--token-file",
        token_file,
        "--root-cert",
        root_cert,
        "--uplink",
        uplink,
        "--instance",
        instance,
        "--drain-seconds",
        str(drain),
        "--listen-address",
        listen_address,
        *pod_netns,
    ]


def write_credentials(state_dir: Path, nodes: list[str]) -> tuple[str, dict[str, str]]:
    """One random bearer token per node: the controller's table plus a token file each agent reads."""
    cred_dir = state_dir / "credentials"
    cred_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens = {node: secrets.token_urlsafe(32) for node in nodes}
    table = cred_dir / "node-tokens.json"
    _write_private(table, json.dumps(tokens, indent=2))
    per_node = {}
    for node, token in tokens.items():
        path = cred_dir / f"{node}.token"
        _write_private(path, token)
        per_node[node] = str(path)
    return str(table), per_node


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def wait_ready(netns: str, ip: str, port: int, record: ProcessRecord, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``http://ip:port/healthz/ready`` from inside ``netns`` until 200, failing fast if the process dies."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not is_alive(record):
            raise LabProcessError(
                f"{record.name} exited before becoming ready; log {record.log}, last lines:\n{log_tail(record.log)}"
            )
        try:
            status, body = client.http_get(netns, ip, port, READY_PATH, timeout=2.0)
            if status == 200:
                return
            last = f"status {status}: {body[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = str(e)
        time.sleep(0.2)
    raise LabProcessError(
        f"{record.name} not ready at http://{ip}:{port}{READY_PATH} after {timeout:.0f}s ({last}); "
        f"log {record.log}, last lines:\n{log_tail(record.log)}"
    )


def start(lab: Lab) -> None:
    """Credentials, then the controller (ready), then every agent (ready).

    In a lab with IPv6 (dual-stack or IPv6-only) the control plane runs over IPv6 (the controller listens on ``::``,
    agents dial its IPv6 address), while IPv4 labs keep it on IPv4."""
    plan = lab.plan
    controller_ip = plan.core_ip6 if plan.ipv6 else plan.core_ip
    any_address = "::" if plan.ipv6 else "0.0.0.0"
    tokens_file, token_files = write_credentials(lab.state_dir, list(plan.nodes))
    ca_dir = lab.state_dir / "ca"
    ca_dir.mkdir(mode=0o700, exist_ok=True)
    lab.record_files(node_tokens=tokens_file, ca_dir=str(ca_dir))
    controller = lab.spawn(
        plan.core_netns,
        controller_argv(str(lab.config_dir), str(ca_dir), tokens_file, any_address),
        "controller",
        role="controller",
    )
    wait_ready(plan.core_netns, controller_ip, MONITORING_PORT, controller)
    agents = []
    for node in plan.nodes.values():
        agent_dir = lab.state_dir / "agents" / node.name
        agent_dir.mkdir(parents=True, exist_ok=True)
        # All lab nodes share the host's bpffs: the node netns name is a globally unique capture instance.
        lab.record_pin_dir(os.path.join(PIN_ROOT, node.netns))
        argv = agent_argv(
            node.name,
            f"[{controller_ip}]:{XDS_TLS_PORT}" if plan.ipv6 else f"{controller_ip}:{XDS_TLS_PORT}",
            str(agent_dir),
            token_files[node.name],
            str(ca_dir / "root-cert.pem"),
            node.uplink,
            node.netns,
            lab.drain_seconds,
            any_address,
            pod_netns_prefix=f"{plan.name}-pod-" if lab.in_pod else None,
            in_pod_hbone=lab.in_pod_hbone,
        )
        agents.append((node, lab.spawn(node.netns, argv, f"agent-{node.name}", role="agent")))
    for node, record in agents:
        wait_ready(node.netns, node.ip, AGENT_READY_PORT, record)
