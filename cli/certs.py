"""`ambitctl certs`: the workload certificates an agent holds, from its admin endpoint ``/certs``.

The admin port listens on the node's localhost only, so ``--lab LAB --node NAME`` opens the connection from inside
that node's network namespace; ``--admin HOST:PORT`` talks to a reachable admin port directly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

DEFAULT_ADMIN_PORT = 15000


class AdminError(Exception):
    """The agent's admin endpoint could not be reached or answered something unusable."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("certs", help="list the workload certificates an agent holds")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--admin", metavar="HOST:PORT", help=f"agent admin address [127.0.0.1:{DEFAULT_ADMIN_PORT}]")
    target.add_argument("--lab", metavar="LAB", help="lab name (with --node): reach the agent inside the node netns")
    parser.add_argument("--node", help="lab node whose agent to ask")
    parser.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT, help="admin port inside the node netns")
    parser.add_argument("--json", action="store_true", help="print the raw JSON rows")
    parser.set_defaults(func=run)


@contextlib.contextmanager
def _connect(args: argparse.Namespace) -> Iterator[socket.socket]:
    if args.lab or args.node:
        if not (args.lab and args.node):
            raise AdminError("--lab and --node go together")
        from lab import Lab, LabError
        from lab import netns as lab_netns

        try:
            ns = Lab.load(args.lab).node(args.node).netns
            with lab_netns.enter(ns):
                sock = socket.create_connection(("127.0.0.1", args.admin_port), timeout=5)
        except (LabError, OSError) as e:
            raise AdminError(f"agent admin on node {args.node} of lab {args.lab}: {e}") from None
    else:
        host, _, port = (args.admin or f"127.0.0.1:{DEFAULT_ADMIN_PORT}").rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5)
        except (OSError, ValueError) as e:
            raise AdminError(f"agent admin {args.admin}: {e}") from None
    try:
        yield sock
    finally:
        sock.close()


def fetch_json(args: argparse.Namespace, path: str) -> Any:
    """GET ``path`` from the agent's admin port chosen by ``--admin`` or ``--lab/--node``."""
    with _connect(args) as sock:
        conn = http.client.HTTPConnection("127.0.0.1", args.admin_port, timeout=5)
        conn.sock = sock
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise AdminError(f"GET {path}: {e}") from None
    if resp.status != 200:
        raise AdminError(f"GET {path}: HTTP {resp.status} {body[:200].decode(errors='replace')}")
    try:
        return json.loads(body)
    except ValueError:
        raise AdminError(f"GET {path}: not JSON") from None


def _remaining(expiry: str, now: datetime.datetime) -> str:
    if not expiry:
        return "-"
    try:
        left = (datetime.datetime.fromisoformat(expiry.replace("Z", "+00:00")) - now).total_seconds()
    except ValueError:
        return "?"
    if left <= 0:
        return "EXPIRED"
    hours, rest = divmod(int(left), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_table(rows: list[dict[str, Any]], now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    headers = ["IDENTITY", "STATE", "SERIAL", "EXPIRY", "REMAINING", "LAST ERROR"]
    table = [
        [
            str(r.get("identity", "")),
            str(r.get("state", "")),
            str(r.get("serial", ""))[:16] or "-",
            str(r.get("expiry", "")) or "-",
            _remaining(str(r.get("expiry", "")), now),
            str(r.get("last_error", "")) or "-",
        ]
        for r in rows
    ]
    if not table:
        return "no certificates (no enrolled workloads on this node yet)"
    widths = [max(len(c) for c in col) for col in zip(headers, *table, strict=False)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in [headers, *table]
    )


def run(args: argparse.Namespace) -> int:
    try:
        data = fetch_json(args, "/certs")
    except AdminError as e:
        print(f"ambitctl certs: {e}", file=sys.stderr)
        return 1
    rows = data.get("certificates", []) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        print("ambitctl certs: /certs did not return a list", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
