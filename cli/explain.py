"""`ambitctl explain`: would policy allow this connection, and which policy decides? Asked of the agent that
enforces it (the destination's node), from its live configuration (admin endpoint ``/explain``)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from cli.agent_admin import AdminError, add_target_arguments, fetch_json


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("explain", help="explain the L4 policy decision for a source and destination")
    parser.add_argument("--src", required=True, metavar="IP", help="client address (a pod IP, or any IP)")
    parser.add_argument("--dst", required=True, metavar="IP:PORT", help="destination pod address and target port")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--identity", metavar="SPIFFE_URI", help="peer identity [the source workload's own]")
    who.add_argument("--plaintext", action="store_true", help="no peer identity (a client outside the mesh)")
    add_target_arguments(parser, node_help="lab node whose agent to ask (the destination's node)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.set_defaults(func=run)


def format_answer(a: dict[str, Any]) -> str:
    lines = [
        f"{a['decision'].upper()}: {a['reason']}" + (f" ({a['policy']})" if a.get("policy") else ""),
        f"  connection:  {a['connection']}",
        f"  source:      {a.get('source_workload') or '(not a known workload)'}",
        f"  destination: {a['destination_workload']}",
        "  policies:    " + (", ".join(a["applicable_policies"]) or "(none apply)"),
    ]
    lines += [f"  {note}" for note in a.get("dry_run", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    query = {"src": args.src, "dst": args.dst}
    if args.identity:
        query["identity"] = args.identity
    if args.plaintext:
        query["plaintext"] = "1"
    try:
        answer = fetch_json(args, "/explain?" + urllib.parse.urlencode(query))
    except AdminError as e:
        print(f"ambitctl explain: {e}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2) if args.json else format_answer(answer))
    return 0 if answer.get("decision") == "allow" else 3
