"""The benchmark's own C backends and clients, compiled with gcc at run time into the results directory.

Compiling per run (rather than shipping binaries) keeps the sources the only artifact and records the exact build
next to the numbers it produced.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCES = Path(__file__).resolve().parent


class ToolBuildError(RuntimeError):
    """gcc failed; the message carries its output."""


@dataclass(frozen=True)
class Tools:
    echo_server: Path
    pingpong: Path


def build_tools(out_dir: Path) -> Tools:
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name in ("echo_server", "pingpong"):
        target = out_dir / name
        argv = ["gcc", "-O2", "-Wall", "-o", str(target), str(SOURCES / f"{name}.c")]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ToolBuildError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        built[name] = target
    return Tools(echo_server=built["echo_server"], pingpong=built["pingpong"])
