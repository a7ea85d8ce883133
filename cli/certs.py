"""`ambitctl certs`: the workload certificates an agent holds, from its admin endpoint ``/certs``."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from typing import Any

from cli.agent_admin import AdminError, add_target_arguments, fetch_json
from cli.table import render


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("certs", help="list the workload certificates an agent holds")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw JSON (ztunnel's certificates shape)")
    parser.set_defaults(func=run)


def _instant(text: str) -> datetime.datetime:
    """A dump's time ("...Z"); ValueError if it is none."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _remaining(expiry: str, now: datetime.datetime) -> str:
    if not expiry:
        return "-"
    try:
        left = (_instant(expiry) - now).total_seconds()
    except ValueError:
        return "?"
    if left <= 0:
        return "EXPIRED"
    hours, rest = divmod(int(left), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _serial_hex(decimal: str) -> str:
    """The dump's serial is decimal (ztunnel's); shown in hex like istioctl and the agent's logs."""
    try:
        return f"{int(decimal):x}"
    except ValueError:
        return decimal


def _row(entry: dict[str, Any], now: datetime.datetime) -> list[str]:
    """One identity from /certs (ztunnel's shape: see agent.identity.CertsDump), its leaf being certChain[0].

    The expiry shown is the chain's earliest: peers refuse the leaf once an intermediate under it lapses, and istiod
    signs leaves that outlive its own certificate (Ambit's CA cuts them to it)."""
    state, _, reason = str(entry.get("state", "")).partition(": ")
    chain = entry.get("certChain")
    certs = [c for c in chain if isinstance(c, dict)] if isinstance(chain, list) else []
    leaf = certs[0] if certs else {}
    expiry = str(leaf.get("expirationTime", ""))
    for cert in certs[1:]:
        with contextlib.suppress(ValueError):  # an unreadable time leaves the leaf's ("?" below if that is one)
            if _instant(str(cert.get("expirationTime", ""))) < _instant(expiry):
                expiry = str(cert["expirationTime"])
    return [
        str(entry.get("identity", "")),
        state,
        _serial_hex(str(leaf.get("serialNumber", "")))[:16] or "-",
        expiry or "-",
        _remaining(expiry, now),
        # ztunnel has no lastError: its reason is in the state ("Unavailable: <why>").
        str(entry.get("lastError") or reason) or "-",
    ]


def format_table(rows: list[Any], now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    headers = ["IDENTITY", "STATE", "SERIAL", "EXPIRY", "REMAINING", "LAST ERROR"]
    table = [_row(r, now) for r in rows if isinstance(r, dict)]
    if not table:
        return "no certificates (no enrolled workloads on this node yet)"
    return render(headers, table)


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
