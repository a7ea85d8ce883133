"""Transparent sockets (root): listeners that accept for any address and upstream connects that keep the client's
address, for IPv4 and IPv6, with the source port left to connect()."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from agent.sockets import (
    IP_BIND_ADDRESS_NO_PORT,
    IPV6_TRANSPARENT,
    connect_upstream,
    set_transparent,
    transparent_listener,
)

LOOPS = ["asyncio", "uvloop"]


@pytest.mark.parametrize(
    ("family", "server_ip", "client_ip"),
    [(socket.AF_INET, "127.0.0.1", "127.0.0.2"), (socket.AF_INET6, "::1", "::1")],
    ids=["ipv4", "ipv6"],
)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_kept_source_address_leaves_the_port_to_connect(
    loop_name: str, family: socket.AddressFamily, server_ip: str, client_ip: str
) -> None:
    """The client's address is kept, and the port is chosen at connect time, not searched for at bind time."""
    server = socket.create_server((server_ip, 0), family=family)

    async def main() -> None:
        up = await connect_upstream(server.getsockname()[:2], source_ip=client_ip)
        with up:
            peer, client = server.accept()
            peer.close()
            assert client[0] == client_ip
            assert up.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1

    with server:
        if loop_name == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())


@pytest.mark.parametrize(
    ("family", "foreign_ip"),
    [(socket.AF_INET, "10.255.255.1"), (socket.AF_INET6, "fd00:dead::1")],
    ids=["ipv4", "ipv6"],
)
def test_transparent_socket_binds_an_address_the_node_does_not_have(
    family: socket.AddressFamily, foreign_ip: str
) -> None:
    """What keeping a pod's address needs: without the family's own transparent option this bind fails with
    EADDRNOTAVAIL (for IPv6, option 19 at the IPv6 level is IPV6_MULTICAST_LOOP and changes nothing)."""
    with socket.socket(family, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
        plain.bind((foreign_ip, 0))
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        set_transparent(sock, ipv6=family == socket.AF_INET6)
        sock.bind((foreign_ip, 0))
        assert sock.getsockname()[0] == foreign_ip


def test_ipv6_listener_is_transparent() -> None:
    lsock = transparent_listener(0, "::1")
    with lsock:
        assert lsock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT) == 1
