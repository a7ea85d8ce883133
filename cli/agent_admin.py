"""Reaching an agent's admin endpoint (15000) from `ambitctl` commands that read it (certs, explain).

The admin port listens on the node's localhost only, so ``--lab LAB --node NAME`` opens the connection from inside
that node's network namespace; ``--admin HOST:PORT`` talks to a reachable admin port directly.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

DEFAULT_ADMIN_PORT = 15000


class AdminError(Exception):
    """The agent's admin endpoint could not be reached or answered something unusable."""


def add_target_arguments(parser: argparse.ArgumentParser, node_help: str = "lab node whose agent to ask") -> None:
    """``--admin HOST:PORT | --lab LAB --node NAME [--admin-port N]``: which agent to ask."""
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--admin", metavar="HOST:PORT", help=f"agent admin address [127.0.0.1:{DEFAULT_ADMIN_PORT}]")
    target.add_argument("--lab", metavar="LAB", help="lab name (with --node): reach the agent inside the node netns")
    parser.add_argument("--node", help=node_help)
    parser.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT, help="admin port inside the node netns")


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
    """GET ``path`` from the agent's admin port chosen by ``add_target_arguments``' options."""
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
