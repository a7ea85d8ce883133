"""The wildcard address a server binds when none is given."""

from __future__ import annotations

import socket


def any_address() -> str:
    """``::`` where this network namespace can have IPv6 sockets, else ``0.0.0.0``.

    Why: on a dual-stack or IPv6-only cluster an IPv4-only listener is unreachable by half the callers: the agent's
    capture hands enrolled pods' IPv6 connections to its listeners (with none, it drops them, fail closed), and the
    kubelet probes the controller's pod IP, which is IPv6 there (the controller was never Ready). One ``::`` socket
    per port takes both families (IPv4 as ``::ffff:a.b.c.d``); only a kernel without IPv6 refuses it."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return "0.0.0.0"
    return "::"
