"""CPU and memory accounting of proxy processes, and of everything else that shares the machine.

Proxy cost is user + system time of every proxy process (all threads) read before and after a measure, so it is
independent of how busy the rest of the machine is; the "foreign" figure says how much CPU other people's processes
took meanwhile, which is how a reader judges the noise behind a number. On a virtual machine the hypervisor can also
take the CPUs away altogether ("steal"): no process sees that time, so it is read from the kernel's own count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def rss_bytes(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def own_process_tree() -> set[int]:
    """This process and everything it started (backends, proxies, the labs' workloads, controller and agents)."""
    me = psutil.Process(os.getpid())
    return {me.pid, *(c.pid for c in me.children(recursive=True))}


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def pids_in_netns(netns_path: str, cmdline_contains: str) -> list[int]:
    """Processes whose network namespace is netns_path and whose command line mentions cmdline_contains.

    The lab starts the agents; this is how the benchmark finds them without depending on how they were launched.
    """
    want = netns_inode(netns_path)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline_contains not in cmdline:
                continue
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, PermissionError):
            continue
    return found


def pin_all_threads(pid: int, cpus: set[int]) -> None:
    """taskset -a equivalent for a process we did not start ourselves (the lab's agents)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(task), cpus)


@dataclass
class CpuSnapshot:
    """Cumulative CPU seconds per PID of every process on the machine at one moment."""

    per_pid: dict[int, tuple[str, float]]

    @classmethod
    def take(cls) -> CpuSnapshot:
        per_pid: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
            times = proc.info.get("cpu_times")
            if times is not None:
                per_pid[proc.pid] = (proc.info.get("name") or "?", times.user + times.system)
        return cls(per_pid)

    def since(self, earlier: CpuSnapshot) -> dict[int, tuple[str, float]]:
        """CPU seconds each process used between earlier and self (new processes count from zero)."""
        out: dict[int, tuple[str, float]] = {}
        for pid, (name, now) in self.per_pid.items():
            before = earlier.per_pid.get(pid, (name, 0.0))[1]
            if now >= before:
                out[pid] = (name, now - before)
        return out


def foreign_cpu(delta: dict[int, tuple[str, float]], ours: set[int]) -> float:
    return sum(cpu for pid, (_name, cpu) in delta.items() if pid not in ours)


@dataclass(frozen=True)
class Steal:
    """The machine-wide steal counter (USER_HZ ticks summed over all CPUs) and how many CPUs it sums over."""

    ticks: int
    cpus: int


TICKS_PER_S = os.sysconf("SC_CLK_TCK")
STEAL_COLUMN = 8
"""Index of `steal` on /proc/stat's cpu line: cpu user nice system idle iowait irq softirq steal guest guest_nice."""


def parse_steal(proc_stat: str) -> Steal:
    """Steal from the text of /proc/stat. Kernels before 2.6.11 print fewer columns: no steal column means the
    kernel never counted any, so it is 0 rather than an error."""
    ticks = 0
    cpus = 0
    for line in proc_stat.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu":
            ticks = int(fields[STEAL_COLUMN]) if len(fields) > STEAL_COLUMN else 0
        elif fields[0].startswith("cpu") and fields[0][3:].isdigit():
            cpus += 1
    return Steal(ticks, max(cpus, 1))


def read_steal() -> Steal:
    return parse_steal(Path("/proc/stat").read_text())


def steal_between(before: Steal, after: Steal, wall_s: float, ticks_per_s: float = TICKS_PER_S) -> tuple[float, float]:
    """CPU-seconds stolen across all CPUs, and that as a share of all CPUs' time over wall_s (0 when no time passed)."""
    stolen_s = max(after.ticks - before.ticks, 0) / ticks_per_s
    capacity_s = wall_s * after.cpus
    return stolen_s, (stolen_s / capacity_s if capacity_s > 0 else 0.0)


def top_consumers(delta: dict[int, tuple[str, float]], limit: int = 8) -> list[dict[str, object]]:
    """Largest CPU users by process name (summed over PIDs), as the report's "what else was running"."""
    by_name: dict[str, float] = {}
    for name, cpu in delta.values():
        by_name[name] = by_name.get(name, 0.0) + cpu
    ranked = sorted(by_name.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return [{"process": name, "cpu_s": round(cpu, 2)} for name, cpu in ranked if cpu > 0.005]
