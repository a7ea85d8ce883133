"""The lab cluster: build it from a YAML directory, run processes in it, inspect it, tear it down.

Every namespace is recorded in the lab's state file before it is created and every process right after it
starts, so `down` (also from another process, after a crash, or after a failed `up`) finds and removes all of it.
Links and addresses live inside the lab's namespaces and vanish with them.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lab import mesh as mesh_mode
from lab import netns, processes, topology
from lab.errors import LabError, LabProcessError, LabStateError
from lab.plan import CORE_BRIDGE, POD_GATEWAY, POD_GATEWAY6, POD_IFACE, LabPlan, NodeInfo, PodInfo, make_plan
from lab.state import STATE_FILE, STATE_ROOT, LabState, ProcessRecord, recorded_labs, state_dir

WORKLOAD_ECHO_PORT = 9000
WORKLOAD_HTTP_PORT = 8080
WORKLOAD_READY_TIMEOUT = 30.0
CORE = "core"  # exec/spawn target naming the core netns


class Lab:
    def __init__(self, state: LabState) -> None:
        self._state = state
        self._popens: dict[int, subprocess.Popen[bytes]] = {}  # children of this process, reaped on stop

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        config_dir: str | Path,
        name: str | None = None,
        mesh: bool = False,
        drain_seconds: float | None = None,
        in_pod: bool = True,
        in_pod_hbone: bool = False,
    ) -> Lab:
        """Validate ``config_dir``, build the cluster and start a workload in every pod (and the mesh if asked).

        ``drain_seconds`` is the agents' drain time on SIGTERM (default: ``AMBIT_DRAIN_SECONDS`` or the agent's
        default); stopping an agent waits that long plus a margin before killing it. ``in_pod=False`` keeps the
        agents from the pods' namespaces: their passthrough leaves from the node's, as where a runtime keeps them
        out of reach; ``in_pod_hbone`` has their HBONE leave from the pods' too (``--in-pod-hbone``).

        Raises LabConfigError before creating anything when the YAML is invalid; any later failure removes what was
        made and re-raises.
        """
        drain = mesh_mode.drain_seconds(drain_seconds)
        topo = topology.load(config_dir)
        name = name or f"ambit-{secrets.token_hex(2)}"
        plan = make_plan(topo, name)
        _claim(plan)
        copy = state_dir(name) / "config"
        shutil.copytree(config_dir, copy)
        state = LabState(
            name=name,
            source_dir=str(Path(config_dir).resolve()),
            config_dir=str(copy),
            mesh=mesh,
            plan=plan,
            drain_seconds=drain,
            in_pod=in_pod,
            in_pod_hbone=in_pod_hbone,
        )
        state.save()
        lab = cls(state)
        try:
            lab._build_network()
            lab._start_workloads()
            if mesh:
                mesh_mode.start(lab)
            lab._refresh()
            lab._state.phase = "up"
            lab._state.save()
        except BaseException as e:
            try:
                lab.down(keep_logs=True)
            except LabError as cleanup_error:
                e.add_note(f"cleanup after the failed `up` also failed: {cleanup_error}")
            raise
        return lab

    @classmethod
    def load(cls, name: str) -> Lab:
        """Reattach to a lab created by another process (e.g. `ambitctl lab up`)."""
        return cls(LabState.load(name))

    @staticmethod
    def names() -> list[str]:
        return recorded_labs()

    def _build_network(self) -> None:
        plan = self.plan
        self._add_netns(plan.core_netns)
        # Multicast snooping would drop IPv6 neighbour solicitations between nodes until someone sends MLD reports.
        core = [f"link add {CORE_BRIDGE} type bridge" + (" mcast_snooping 0" if plan.ipv6 else "")]
        if plan.ipv4:
            core.append(f"addr add {plan.core_ip}/{_prefixlen(plan.node_subnet)} dev {CORE_BRIDGE}")
        if plan.ipv6:
            core.append(f"addr add {plan.core_ip6}/{_prefixlen(plan.node_subnet6)} dev {CORE_BRIDGE} nodad")
        netns.batch(plan.core_netns, [*core, f"link set {CORE_BRIDGE} up"])
        for node in plan.nodes.values():
            self._add_netns(node.netns)
            _router_sysctls(node.netns, plan.ipv6)
            routes = [f"route add {node.pod_cidr} via {node.ip}"] if plan.ipv4 else []
            if plan.ipv6:
                routes.append(f"route add {node.pod_cidr6} via {node.ip6}")
            netns.batch(
                plan.core_netns,
                [
                    f"link add {node.core_link} type veth peer name {node.uplink} netns {node.netns}",
                    f"link set {node.core_link} master {CORE_BRIDGE} up",
                    *routes,
                ],
            )
            uplink = [f"addr add {node.ip}/{_prefixlen(plan.node_subnet)} dev {node.uplink}"] if plan.ipv4 else []
            if plan.ipv6:
                uplink.append(f"addr add {node.ip6}/{_prefixlen(plan.node_subnet6)} dev {node.uplink} nodad")
            netns.batch(node.netns, [*uplink, f"link set {node.uplink} up"])
        for node in plan.nodes.values():
            others = [o for o in plan.nodes.values() if o.name != node.name]
            routes = [f"route add {o.pod_cidr} via {o.ip}" for o in others] if plan.ipv4 else []
            if plan.ipv6:
                routes += [f"route add {o.pod_cidr6} via {o.ip6}" for o in others]
            netns.batch(node.netns, routes)
        for pod in plan.pods.values():
            if not pod.host_network:
                self._wire_pod(pod, plan.nodes[pod.node], plan.ipv4)

    def _wire_pod(self, pod: PodInfo, node: NodeInfo, ipv4: bool) -> None:
        self._add_netns(pod.netns)
        host_side = [f"link add {pod.host_veth} type veth peer name {POD_IFACE} netns {pod.netns}"]
        pod_side = []
        if ipv4:
            host_side.append(f"addr add {POD_GATEWAY}/32 dev {pod.host_veth} scope link")
            pod_side.append(f"addr add {pod.ip}/32 dev {POD_IFACE}")
        if pod.ip6:
            host_side.append(f"addr add {POD_GATEWAY6}/64 dev {pod.host_veth} nodad")
            pod_side.append(f"addr add {pod.ip6}/128 dev {POD_IFACE} nodad")
        host_side.append(f"link set {pod.host_veth} up")
        pod_side.append(f"link set {POD_IFACE} up")
        if ipv4:
            host_side.append(f"route add {pod.ip}/32 dev {pod.host_veth} src {node.ip}")
            pod_side += [
                f"route add {POD_GATEWAY} dev {POD_IFACE} scope link",
                f"route add default via {POD_GATEWAY} dev {POD_IFACE}",
            ]
        if pod.ip6:
            host_side.append(f"route add {pod.ip6}/128 dev {pod.host_veth} src {node.ip6}")
            pod_side.append(f"route add default via {POD_GATEWAY6} dev {POD_IFACE}")
        netns.batch(node.netns, host_side)
        netns.batch(pod.netns, pod_side)

    def _add_netns(self, name: str) -> None:
        self._state.netns.append(name)
        self._state.save()
        netns.add(name)
        _ipv6_sysctls(name, self.plan.ipv6)

    def _start_workloads(self) -> None:
        started = []
        for pod in self.plan.pods.values():
            if pod.host_network:
                continue
            argv = [sys.executable, "-m", "lab.workload", "--name", pod.name, "--namespace", pod.namespace]
            argv += ["--node", pod.node, "--echo-port", str(WORKLOAD_ECHO_PORT), "--http-port", str(WORKLOAD_HTTP_PORT)]
            if pod.ip6:  # every address of both families (asyncio binds 0.0.0.0 and :: apart, :: IPv6-only)
                argv.append("--bind=")
            started.append((pod, self.spawn(pod.netns, argv, f"workload-{pod.namespace}-{pod.name}", role="workload")))
        for pod, record in started:
            _wait_listening(pod.netns, [WORKLOAD_ECHO_PORT, WORKLOAD_HTTP_PORT], record, WORKLOAD_READY_TIMEOUT)

    # ---- inspection ---------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def plan(self) -> LabPlan:
        return self._state.plan

    @property
    def state_dir(self) -> Path:
        return self._state.dir

    @property
    def config_dir(self) -> Path:
        """The lab's own copy of the YAML directory; the mesh controller watches it, so edits here apply live."""
        return Path(self._state.config_dir)

    @property
    def core_ip(self) -> str:
        return self.plan.core_ip

    @property
    def core_netns(self) -> str:
        return self.plan.core_netns

    @property
    def mesh(self) -> bool:
        return self._state.mesh

    @property
    def drain_seconds(self) -> float:
        return self._state.drain_seconds

    @property
    def in_pod(self) -> bool:
        return self._state.in_pod

    @property
    def in_pod_hbone(self) -> bool:
        return self._state.in_pod_hbone

    @property
    def files(self) -> Mapping[str, str]:
        return dict(self._state.files)

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        return dict(self.plan.nodes)

    @property
    def pods(self) -> dict[str, PodInfo]:
        return dict(self.plan.pods)

    def node(self, name: str) -> NodeInfo:
        try:
            return self.plan.nodes[name]
        except KeyError:
            raise LabError(f"lab {self.name}: no node {name!r} (nodes: {', '.join(self.plan.nodes)})") from None

    def pod(self, name: str) -> PodInfo:
        """A pod by ``namespace/name``, or by bare name when that is unique in the lab."""
        if name in self.plan.pods:
            return self.plan.pods[name]
        matches = [p for p in self.plan.pods.values() if p.name == name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise LabError(f"lab {self.name}: pod name {name!r} is ambiguous: {', '.join(p.key for p in matches)}")
        raise LabError(f"lab {self.name}: no pod {name!r} (pods: {', '.join(self.plan.pods)})")

    def netns_of(self, target: str) -> str:
        """Resolve ``core``, a node name, a pod (``ns/name`` or unique name) or one of the lab's netns names."""
        if target == CORE:
            return self.plan.core_netns
        if target in self._state.netns:
            return target
        if target in self.plan.nodes:
            return self.plan.nodes[target].netns
        return self.pod(target).netns

    def processes(self) -> list[tuple[ProcessRecord, bool]]:
        """Every recorded process and whether it is still alive."""
        return [(r, processes.is_alive(r)) for r in self._state.processes]

    def process(self, name: str) -> ProcessRecord:
        for record in reversed(self._state.processes):
            if record.name == name:
                return record
        raise LabError(f"lab {self.name}: no process {name!r}")

    def status(self) -> dict[str, Any]:
        """Everything `ambitctl lab status` shows, as data."""
        return {
            "name": self.name,
            "phase": self._state.phase,
            "mesh": self.mesh,
            "config_dir": self._state.config_dir,
            "source_dir": self._state.source_dir,
            "state_dir": str(self.state_dir),
            "core": {"netns": self.core_netns, "ip": self.core_ip, "present": netns.exists(self.core_netns)},
            "nodes": [{**vars(n), "present": netns.exists(n.netns)} for n in self.plan.nodes.values()],
            "pods": [{**vars(p), "present": netns.exists(p.netns)} for p in self.plan.pods.values()],
            "processes": [{**vars(r), "alive": alive} for r, alive in self.processes()],
            "files": dict(self._state.files),
        }

    # ---- running things -----------------------------------------------------------------------------------------

    def exec(
        self,
        target: str,
        argv: list[str],
        check: bool = True,
        timeout: float | None = 60.0,
        input: str | None = None,
        capture: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside a pod, node or the core netns."""
        return subprocess.run(
            netns.nsenter_argv(self.netns_of(target), argv),
            check=check,
            timeout=timeout,
            input=input,
            capture_output=capture,
            text=True,
        )

    def spawn(
        self,
        target: str,
        argv: list[str],
        name: str,
        env: dict[str, str] | None = None,
        log_file: str | Path | None = None,
        role: str = "user",
    ) -> ProcessRecord:
        """Start a tracked background process in ``target`` (see :meth:`netns_of`); `down` stops it.

        Its output goes to ``log_file`` (default ``<state dir>/logs/<name>.log``). An ``agent`` is given its drain
        time (plus a margin) between SIGTERM and SIGKILL when stopped, whoever restarts it.
        """
        log = Path(log_file) if log_file else self.state_dir / "logs" / f"{name}.log"
        record = ProcessRecord(name=name, netns=self.netns_of(target), argv=list(argv), log=str(log), role=role)
        if role == "agent":
            record.stop_timeout = self.drain_seconds + mesh_mode.STOP_MARGIN
        popen = processes.start(record, env)
        self._popens[record.pid] = popen
        self._refresh()
        self._state.processes.append(record)
        self._state.save()
        return record

    def stop(self, name: str, timeout: float | None = None) -> None:
        """Stop one tracked process (SIGTERM to its group, SIGKILL after ``timeout``, by default its record's
        ``stop_timeout``: an agent's drain plus a margin)."""
        record = self.process(name)
        processes.stop([record], timeout)
        self._reap(record)

    def restart(self, name: str) -> ProcessRecord:
        """Stop a tracked process (if alive) and start it again with the same command line in the same netns."""
        record = self.process(name)
        self.stop(name)
        return self.spawn(record.netns, list(record.argv), record.name, role=record.role)

    def record_pin_dir(self, path: str) -> None:
        """Register a bpffs directory for `down` to remove; call before starting whatever pins there.

        Pins outlive processes and namespaces on purpose (a restarted agent resumes from them), so the lab removes
        the ones its agents made.
        """
        self._refresh()
        if path not in self._state.pin_dirs:
            self._state.pin_dirs.append(path)
            self._state.save()

    def record_files(self, **files: str) -> None:
        self._refresh()
        self._state.files.update(files)
        self._state.save()

    def _refresh(self) -> None:
        """Re-read the record before changing it: another process (a test, `ambitctl`) may have added to it."""
        if (self.state_dir / STATE_FILE).exists():
            self._state = LabState.load(self.name)

    def _reap(self, record: ProcessRecord) -> None:
        popen = self._popens.pop(record.pid, None)
        if popen is not None:
            popen.poll()

    # ---- teardown -----------------------------------------------------------------------------------------------

    def down(self, keep_logs: bool = False) -> None:
        """Stop every process, delete every namespace, forget the lab. Safe to repeat and to run after a crash.

        ``keep_logs`` leaves ``<state dir>/logs`` (not a lab any more: no state file) so a failed `up` can be
        diagnosed.
        """
        self._refresh()
        state = self._state
        problems: list[str] = []
        if state.dir.is_dir():
            state.phase = "deleting"
            state.save()
        processes.stop(state.processes)
        for record in state.processes:
            self._reap(record)
        for name in state.netns:
            try:
                processes.kill_pids(netns.pids(name))
                netns.delete(name)
            except LabError as e:
                problems.append(str(e))
        for pin_dir in state.pin_dirs:
            try:
                _remove_pins(pin_dir)
            except OSError as e:
                problems.append(f"cannot remove bpffs pins {pin_dir}: {e}")
        if problems:
            raise LabError(
                f"lab {self.name}: teardown incomplete (state kept in {state.dir}):\n  " + "\n  ".join(problems)
            )
        _remove_state_dir(state.dir, keep_logs)


def down_all() -> list[str]:
    """Tear down every recorded lab and clear leftover logs of failed ups; returns the labs removed."""
    removed = []
    for name in recorded_labs():
        Lab.load(name).down()
        removed.append(name)
    if STATE_ROOT.is_dir():
        for leftover in STATE_ROOT.iterdir():
            forget(leftover.name)
    return removed


def forget(name: str) -> bool:
    """Remove the logs a failed `up` left under ``name``; never touches a live lab (one with a state file)."""
    d = state_dir(name)
    if not d.is_dir() or (d / STATE_FILE).exists():
        return False
    shutil.rmtree(d)
    return True


def _claim(plan: LabPlan) -> None:
    """Refuse to build over an existing lab or over namespaces nobody recorded (never adopt or delete those)."""
    d = state_dir(plan.name)
    if (d / STATE_FILE).exists():
        raise LabStateError(f"lab {plan.name!r} already exists ({d}); run `ambitctl lab down --name {plan.name}` first")
    clashes = [n for n in plan.netns_names if netns.exists(n)]
    if clashes:
        raise LabStateError(
            f"network namespaces {', '.join(clashes)} exist but belong to no recorded lab; pick another lab name "
            "or delete them with `ip netns delete`"
        )
    if d.exists():
        shutil.rmtree(d)  # logs left by an earlier failed `up` of the same name
    d.mkdir(parents=True)


def _remove_state_dir(d: Path, keep_logs: bool) -> None:
    if not d.exists():
        return
    if not keep_logs:
        shutil.rmtree(d)
        return
    for entry in d.iterdir():
        if entry.name != "logs":
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _remove_pins(pin_dir: str) -> None:
    """Delete one lab pin directory, and its parent when nothing else is left in it (as the agent's own cleanup does:
    other labs and agents may share it, and rmdir only removes it empty)."""
    path = Path(pin_dir)
    if path.is_dir():
        shutil.rmtree(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _prefixlen(cidr: str) -> str:
    return cidr.split("/")[1]


def _router_sysctls(name: str, ipv6: bool) -> None:
    """Nodes forward between pods and the uplink; rp_filter off because replies may come back asymmetrically
    once the agent spoofs client addresses."""
    netns.write_sysctl(name, "net.ipv4.ip_forward", "1")
    for scope in ("all", "default"):
        netns.write_sysctl(name, f"net.ipv4.conf.{scope}.rp_filter", "0")
        if ipv6:
            netns.write_sysctl(name, f"net.ipv6.conf.{scope}.forwarding", "1")


def _ipv6_sysctls(name: str, ipv6: bool) -> None:
    """An IPv4 lab turns IPv6 off on its links: no DAD delay or ND chatter in captures. A lab with IPv6 keeps it
    and turns duplicate address detection off, so addresses work at once (the lab assigns them, no duplicates)."""
    if not Path("/proc/sys/net/ipv6").exists():
        if ipv6:
            raise LabError("a lab with IPv6 needs IPv6 in the kernel (no /proc/sys/net/ipv6)")
        return
    for scope in ("all", "default"):
        if ipv6:
            netns.write_sysctl(name, f"net.ipv6.conf.{scope}.accept_dad", "0")
        else:
            netns.write_sysctl(name, f"net.ipv6.conf.{scope}.disable_ipv6", "1")


def _wait_listening(ns: str, ports: list[int], record: ProcessRecord, timeout: float) -> None:
    """Wait until every port accepts on 127.0.0.1 inside ``ns``, failing fast with the log if the process died."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if not processes.is_alive(record):
            raise LabProcessError(
                f"{record.name} exited during start; log {record.log}, last lines:\n{processes.log_tail(record.log)}"
            )
        if time.monotonic() > deadline:
            raise LabProcessError(
                f"{record.name} not listening on {pending} after {timeout:.0f}s; log {record.log}, last lines:\n"
                f"{processes.log_tail(record.log)}"
            )
        with netns.enter(ns):
            sock = socket.socket()
        with sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", pending[0])) == 0:
                pending.pop(0)
                continue
        time.sleep(0.05)
