"""`ambitctl lab up|down|status|exec`: the local network-namespace cluster (see lab/)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import Lab, LabError, down_all, forget

DEFAULT_DIR = str(Path(__file__).resolve().parents[1] / "examples" / "basic")
DEFAULT_NAME = "ambit-lab"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("lab", help="build, inspect and remove a local netns cluster")
    commands = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    up = commands.add_parser("up", help="build a lab from a YAML directory and start its workloads")
    up.add_argument("--dir", default=DEFAULT_DIR, help="directory of Kubernetes-style YAML [examples/basic]")
    up.add_argument("--name", default=DEFAULT_NAME, help=f"lab name, prefix of every netns it creates [{DEFAULT_NAME}]")
    up.add_argument("--mesh", action="store_true", help="also start ambit-controller and one ambit-agent per node")
    up.add_argument(
        "--drain-seconds",
        type=float,
        default=None,
        help="agents' drain on SIGTERM; stopping one waits for it [AMBIT_DRAIN_SECONDS or the agent's 5 s]",
    )
    up.set_defaults(func=_guard(_up))

    down = commands.add_parser("down", help="remove a lab: processes, namespaces, state")
    target = down.add_mutually_exclusive_group()
    target.add_argument("--name", help="lab to remove (default: the only recorded lab)")
    target.add_argument("--all", action="store_true", help="remove every lab recorded under /run/ambit/labs")
    down.set_defaults(func=_guard(_down))

    status = commands.add_parser("status", help="show nodes, pods, addresses and processes")
    status.add_argument("--name", help="lab to show (default: every recorded lab)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_guard(_status))

    exec_ = commands.add_parser("exec", help="run a command in a pod, node or `core` netns: exec POD -- CMD...")
    exec_.add_argument("--name", help="lab (default: the only recorded lab)")
    exec_.add_argument("target", help="pod (name or ns/name), node name, or `core`")
    exec_.add_argument("cmd", nargs=argparse.REMAINDER, help="command and arguments (after --)")
    exec_.set_defaults(func=_guard(_exec))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Lab errors are the user's to fix (bad YAML, name clash): print them plainly, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as e:
            print(f"ambitctl lab {args.lab_command}: {e}", file=sys.stderr)
            return 1

    return run


def _only_lab(name: str | None) -> str:
    if name:
        return name
    names = Lab.names()
    if len(names) == 1:
        return names[0]
    raise LabError("no lab is running" if not names else f"several labs are running ({', '.join(names)}); use --name")


def _up(args: argparse.Namespace) -> int:
    lab = Lab.up(args.dir, name=args.name, mesh=args.mesh, drain_seconds=args.drain_seconds)
    print(format_status(lab.status()))
    print(f"\nremove it with: ambitctl lab down --name {lab.name}")
    return 0


def _down(args: argparse.Namespace) -> int:
    if args.all:
        removed = down_all()
        print(f"removed {len(removed)} lab(s){': ' + ', '.join(removed) if removed else ''}")
        return 0
    if args.name and forget(args.name):
        print(f"removed the logs of failed lab {args.name}")
        return 0
    name = _only_lab(args.name)
    Lab.load(name).down()
    print(f"removed lab {name}")
    return 0


def _status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else Lab.names()
    statuses = [Lab.load(n).status() for n in names]
    if args.json:
        print(json.dumps(statuses, indent=2))
    elif not statuses:
        print("no labs")
    else:
        print("\n\n".join(format_status(s) for s in statuses))
    return 0


def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise LabError("no command given: ambitctl lab exec POD -- CMD...")
    lab = Lab.load(_only_lab(args.name))
    return lab.exec(args.target, cmd, check=False, timeout=None, capture=False).returncode


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines)


def _mark(present: bool) -> str:
    return "" if present else " (MISSING)"


def _both(entry: dict[str, Any], v4: str, v6: str) -> str:
    """A dual-stack lab's two addresses (or ranges) in one cell; an IPv6-only lab's in the IPv4 field's place."""
    return ",".join(a for a in (entry.get(v4), entry.get(v6)) if a)


def format_status(s: dict[str, Any]) -> str:
    core = s["core"]
    head = [
        f"lab {s['name']}  phase={s['phase']}  mesh={'yes' if s['mesh'] else 'no'}",
        f"  config {s['config_dir']} (from {s['source_dir']}), state {s['state_dir']}",
        f"  core netns {core['netns']}{_mark(core['present'])}  ip {core['ip']}",
        *(f"  {key} {path}" for key, path in sorted(s["files"].items())),
    ]
    nodes = _table(
        ["NODE", "IP", "POD CIDR", "UPLINK", "NETNS"],
        [
            [
                n["name"],
                _both(n, "ip", "ip6"),
                _both(n, "pod_cidr", "pod_cidr6"),
                n["uplink"],
                n["netns"] + _mark(n["present"]),
            ]
            for n in s["nodes"]
        ],
    )
    pods = _table(
        ["POD", "NODE", "IP", "SERVICE ACCOUNT", "HOST VETH", "NETNS"],
        [
            [
                f"{p['namespace']}/{p['name']}",
                p["node"],
                _both(p, "ip", "ip6"),
                p["service_account"],
                p["host_veth"] or "(hostNetwork)",
                p["netns"] + _mark(p["present"]),
            ]
            for p in s["pods"]
        ],
    )
    procs = _table(
        ["PROCESS", "ROLE", "PID", "STATE", "NETNS", "LOG"],
        [
            [p["name"], p["role"], str(p["pid"]), "alive" if p["alive"] else "DEAD", p["netns"], p["log"]]
            for p in s["processes"]
        ],
    )
    return "\n".join(head) + "\n\n" + nodes + "\n\n" + pods + "\n\n" + procs
