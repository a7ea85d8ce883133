"""`ambitctl workloads`, and its siblings `services`, `policies` and `config-dump`: what one agent holds, from its
admin ``/config_dump`` (one module: the four read the same dump and differ only in the table they print). The dump
is in ztunnel's shape (agent.config_dump), the one `istioctl ztunnel-config` reads.

Read from the agent rather than the controller because that is what the data path acts on: a workload missing
here is one the agent cannot route to or protect, whatever the controller thinks it sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cli.agent_admin import AdminError, add_target_arguments, fetch_json
from cli.table import render

DEFAULT_TRUST_DOMAIN = "cluster.local"


def register(subparsers: Any) -> None:
    for name, help_text, fmt in (
        ("workloads", "list the workloads an agent knows (address, node, tunnel, identity)", format_workloads),
        ("services", "list the services an agent knows (addresses and ports)", format_services),
        ("policies", "list the authorization policies an agent holds", format_policies),
    ):
        parser = subparsers.add_parser(name, help=help_text)
        add_target_arguments(parser)
        parser.add_argument("--namespace", "-n", help="only this namespace")
        parser.add_argument("--json", action="store_true", help="print the raw JSON entries")
        parser.set_defaults(func=_lister(name, fmt))
    dump = subparsers.add_parser("config-dump", help="print an agent's whole /config_dump as JSON")
    add_target_arguments(dump)
    dump.set_defaults(func=_config_dump)


def _fetch(command: str, args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        data = fetch_json(args, "/config_dump")
    except AdminError as e:
        print(f"ambitctl {command}: {e}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(f"ambitctl {command}: /config_dump did not return an object", file=sys.stderr)
        return None
    return data


def _lister(section: str, fmt: Callable[[list[dict[str, Any]]], str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        data = _fetch(section, args)
        if data is None:
            return 1
        entries = data.get(section, [])
        if isinstance(entries, dict):  # keyed, as an older ztunnel's dump (istioctl reads either)
            entries = list(entries.values())
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            print(f"ambitctl {section}: /config_dump has no list of {section}", file=sys.stderr)
            return 1
        if args.namespace:
            entries = [e for e in entries if e.get("namespace") == args.namespace]
        print(json.dumps(entries, indent=2) if args.json else fmt(entries))
        return 0

    return run


def _config_dump(args: argparse.Namespace) -> int:
    data = _fetch("config-dump", args)
    if data is None:
        return 1
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def identity(workload: dict[str, Any]) -> str:
    """The SPIFFE ID a workload's certificate carries (the dump fills in the defaults, as ztunnel's does)."""
    trust_domain = workload.get("trustDomain") or DEFAULT_TRUST_DOMAIN
    account = workload.get("serviceAccount") or "default"
    return f"spiffe://{trust_domain}/ns/{workload.get('namespace', '')}/sa/{account}"


def format_workloads(entries: list[dict[str, Any]]) -> str:
    """ztunnel's workload shape (agent.config_dump.workload_json): `workloadIps`, `protocol` HBONE or TCP, `status`
    Healthy or Unhealthy."""
    rows = [
        [
            str(w.get("namespace", "")),
            str(w.get("name", "")),
            ",".join(map(str, w.get("workloadIps", []))) or str(w.get("hostname", "")) or "-",
            str(w.get("node", "")) or "-",
            str(w.get("protocol", "TCP")),
            identity(w),
            str(w.get("status", "Healthy")),
        ]
        for w in entries
    ]
    if not rows:
        return "no workloads"
    return render(["NAMESPACE", "NAME", "ADDRESS", "NODE", "TUNNEL", "IDENTITY", "STATUS"], rows)


def _ports(service: dict[str, Any]) -> str:
    """A service's `ports`, ztunnel's map of service port to target port (0: the same port)."""
    ports = service.get("ports")
    out = []
    for port, target in ports.items() if isinstance(ports, dict) else ():
        out.append(f"{port}" if not target or str(target) == str(port) else f"{port}->{target}")
    return ",".join(out) or "-"


def _addresses(service: dict[str, Any]) -> str:
    """`vips` (`network/ip`) as their IPs, then `cidrVips` (`{network, cidr}`)."""
    out = [str(v).partition("/")[2] or str(v) for v in service.get("vips", [])]
    out += [str(c.get("cidr", "")) for c in service.get("cidrVips", []) if isinstance(c, dict)]
    return ",".join(out) or "-"


def format_services(entries: list[dict[str, Any]]) -> str:
    rows = [[str(s.get("namespace", "")), str(s.get("hostname", "")), _addresses(s), _ports(s)] for s in entries]
    if not rows:
        return "no services"
    return render(["NAMESPACE", "HOSTNAME", "ADDRESSES", "PORTS"], rows)


def format_policies(entries: list[dict[str, Any]]) -> str:
    """ztunnel's policy shape: `scope` Global, Namespace or WorkloadSelector, `action` Allow or Deny, `rules` one
    list per rule."""
    rows = [
        [
            str(p.get("namespace", "")),
            str(p.get("name", "")),
            str(p.get("scope", "Global")),
            str(p.get("action", "Allow")),
            str(len(p.get("rules", []))),
            "yes" if p.get("dryRun") else "no",
        ]
        for p in entries
    ]
    if not rows:
        return "no policies"
    return render(["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES", "DRY-RUN"], rows)
