"""Start, check and stop the lab's processes inside its namespaces.

Processes run through `nsenter --net=` (not `ip netns exec`, which remounts /sys and hides bpffs pins), in their
own session so one signal reaches everything they fork, with output appended to a log file in the lab's state
directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path

import psutil

from lab.netns import nsenter_argv
from lab.state import ProcessRecord


def start(record: ProcessRecord, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Launch ``record`` and fill in its pid and start time."""
    Path(record.log).parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(record.log, "ab") as log:
        popen = subprocess.Popen(
            nsenter_argv(record.netns, record.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    record.pid = popen.pid
    try:
        record.start_time = psutil.Process(popen.pid).create_time()
    except psutil.NoSuchProcess:
        record.start_time = 0.0  # already gone: is_alive() reports it dead
    return popen


def _process(record: ProcessRecord) -> psutil.Process | None:
    """The live process behind ``record``, or None when it exited or the pid now belongs to someone else."""
    if record.pid <= 0:
        return None
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.start_time) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def is_alive(record: ProcessRecord) -> bool:
    return _process(record) is not None


def stop(records: list[ProcessRecord], timeout: float | None = None) -> None:
    """SIGTERM each process group at once, then SIGKILL whatever is left after its record's ``stop_timeout`` (or
    ``timeout`` for all). An agent drains on SIGTERM: killed before its drain ends, it loses the access-log lines
    of the connections it was still carrying."""
    procs = [(p, r.stop_timeout if timeout is None else timeout) for r in records if (p := _process(r)) is not None]
    for proc, _ in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    started = time.monotonic()
    killed = []
    for proc, limit in sorted(procs, key=lambda pair: pair[1]):
        _, alive = psutil.wait_procs([proc], timeout=max(0.0, started + limit - time.monotonic()))
        for left in alive:
            _signal_group(left.pid, signal.SIGKILL)
            killed.append(left)
    psutil.wait_procs(killed, timeout=3.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # started with start_new_session: pgid == pid


def kill_pids(pids: list[int]) -> None:
    """SIGKILL stragglers found inside a lab netns (e.g. started by hand with `lab exec`, or orphaned by a crash)."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.kill()
            procs.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=3.0)


def log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError as e:
        return f"(cannot read {path}: {e})"
