"""Short-lived child that compiles bpf/redirect.bpf.c with BCC, loads the tc program and pins it.

Run by agent/redirect.py as ``python -m agent.redirect_loader SOURCE FUNCTION PROG_PIN CFLAGS...``. Compiling in
a child keeps BCC, LLVM and clang out of the long-running agent: once touched they stay resident (~130 MB) for the
life of the process that compiled. The maps are pinned by the source itself (BPF_TABLE_PINNED, reused when they
exist); the program is pinned at PROG_PIN, from where the agent takes its fd for the tc filters.

The child's stderr carries libbcc's clang diagnostics and verifier log; on failure it prints one JSON line to
stdout, {"stage": "import" | "compile" | "load" | "pin", "error": "..."}, and exits 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from agent import redirect_syscalls as sysbpf


def load_and_pin(source: str, function: str, prog_pin: str, cflags: list[str]) -> None:
    stage = "import"
    try:
        from bcc import BPF

        stage = "compile"
        bpf = BPF(src_file=source.encode(), cflags=cflags)
        stage = "load"
        fn = bpf.load_func(function.encode(), BPF.SCHED_CLS)
        stage = "pin"
        # A previous agent's program stays alive through its filters until the new agent swaps them.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prog_pin)
        sysbpf.obj_pin(int(fn.fd), prog_pin)
    except Exception as exc:  # every failure is reported to the parent with its stage; it picks the error type
        print(json.dumps({"stage": stage, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        raise SystemExit(1) from exc


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit("usage: python -m agent.redirect_loader SOURCE FUNCTION PROG_PIN [CFLAGS...]")
    load_and_pin(argv[0], argv[1], argv[2], argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
