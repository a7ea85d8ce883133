"""Processes the benchmark starts: tracked by PID, optionally inside a network namespace and pinned to CPUs.

Everything started here is stopped by its own PID (never by name), so a run sharing the machine with other people's
processes can only ever end its own. Output goes to a log file per process in the results directory, which is where
a FAILED configuration's reason is looked up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ProcessDied(RuntimeError):
    """A benchmark process exited while it was needed; the message carries the tail of its log."""


def netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/var/run/netns/{netns}"


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """`nsenter --net` rather than `ip netns exec`: the latter remounts /sys and would hide bpffs pins."""
    if netns is None:
        return list(argv)
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def pinned(cpus: Sequence[int] | None, argv: Sequence[str]) -> list[str]:
    if not cpus:
        return list(argv)
    return ["taskset", "-c", ",".join(str(c) for c in cpus), *argv]


def run(
    argv: Sequence[str], netns: str | None = None, cpus: Sequence[int] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived measuring client to completion (iperf3 -c, pingpong)."""
    return subprocess.run(
        in_netns(netns, pinned(cpus, argv)), capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Tracked:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""


class ProcessGroup:
    """Long-running processes of one run (backends, proxies); `stop_all` is safe to call more than once."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[Tracked] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        netns: str | None = None,
        cpus: Sequence[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Tracked:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log = self._log_dir / f"{name}.log"
        full = in_netns(netns, pinned(cpus, argv))
        with log.open("wb") as out:
            out.write((" ".join(full) + "\n").encode())
            out.flush()
            # A new session makes Ctrl-C in the terminal reach only us; we then stop these by PID in order.
            popen = subprocess.Popen(
                full, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        tracked = Tracked(name, popen, log)
        self._procs.append(tracked)
        return tracked

    def check(self, tracked: Tracked) -> None:
        if not tracked.alive():
            raise ProcessDied(f"{tracked.name} exited with {tracked.popen.returncode}: {tracked.log_tail()}")

    def stop(self, tracked: Tracked, grace: float = 5.0) -> None:
        if tracked.alive():
            # nsenter/taskset exec the target, so the PID is the real process; signal only that PID.
            with contextlib.suppress(ProcessLookupError):
                os.kill(tracked.pid, signal.SIGTERM)
            try:
                tracked.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tracked.pid, signal.SIGKILL)
                tracked.popen.wait(timeout=grace)
        if tracked in self._procs:
            self._procs.remove(tracked)

    def stop_all(self) -> None:
        for tracked in reversed(list(self._procs)):
            self.stop(tracked)


def wait_for_listener(netns: str | None, port: int, timeout: float = 10.0) -> None:
    """Poll `ss` until a TCP socket listens on port inside netns; no probe connection (iperf3 would log it)."""
    deadline = time.monotonic() + timeout
    while True:
        result = run(["ss", "-Hltn", f"sport = :{port}"], netns=netns, timeout=5.0)
        if result.returncode == 0 and result.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on port {port} (netns {netns}) after {timeout:.0f} s")
        time.sleep(0.1)
