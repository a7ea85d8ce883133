"""An on-demand DNS answer on an IPv6 link-local address reaches the server on the link its scope id names.

The proxy runs in a network namespace of this test with two veth links to two more, each far end holding the
same address (fe80::b) with a server that answers with its own name: only the scope id says which link a
connection to fe80::b takes, and without one the connect fails (EINVAL). The endpoints' hostnames are numeric
(`fe80::b%<index>`, which getaddrinfo parses itself, its zone into the scope id) or a made-up name answered by an
injected resolver, so no DNS query leaves the machine. Everything made here carries a prefix unique to the run
and is removed however the test ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from agent.ondemand_dns import OnDemandResolver, system_resolve
from agent.outbound import is_node_address
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from lab import netns
from tests.integration.proxy_mesh import Agent
from tests.support.proxy_certs import StaticCertificates
from tests.support.proxy_echo import connect_from
from tests.support.workloads import pod_workload

T = TypeVar("T")
SERVER_PORT = 8443
CLIENT_IP = "127.0.0.10"  # the proxy's namespace's own loopback


@dataclass
class Links:
    proxy: str  # netns of the proxy (and its client)
    far: dict[str, str]  # far end's label ("b", "c") -> its netns
    index: dict[str, int]  # far end's label -> the proxy side's interface index of the link to it


@pytest.fixture
def links() -> Iterator[Links]:
    tag = f"ambit-{secrets.token_hex(2)}"
    proxy = f"{tag}-px"
    made: list[str] = []
    try:
        made.append(proxy)
        netns.add(proxy)
        far: dict[str, str] = {}
        for label in ("b", "c"):
            far[label] = f"{tag}-{label}"
            made.append(far[label])  # before: a namespace made by a failing add is removed too
            netns.add(far[label])
            near, peer = f"{tag}-a{label}", f"{tag}-{label}"  # at most 13 characters
            netns.ip("link", "add", near, "type", "veth", "peer", "name", peer, "netns", far[label], netns=proxy)
            # only the fixed addresses (no EUI-64 ones), usable at once (no duplicate address detection)
            for ns, dev, addr in ((proxy, near, "fe80::a"), (far[label], peer, "fe80::b")):
                netns.batch(
                    ns,
                    [f"link set {dev} addrgenmode none", f"addr add {addr}/64 dev {dev} nodad", f"link set {dev} up"],
                )
        with netns.enter(proxy):
            index = {label: socket.if_nametoindex(f"{tag}-a{label}") for label in far}
        yield Links(proxy, far, index)
    finally:
        for ns in reversed(made):  # its veth ends go with it
            netns.delete(ns)


def run_in(ns: str, scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`scenario` on an event loop of its own, on a thread inside `ns`: the sockets it opens (and the resolver's
    executor threads, started from it) are that namespace's."""

    def run() -> T:
        with netns.enter(ns):
            return asyncio.run(scenario())

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(run).result(timeout=120)


def named_server(label: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(label.encode() + b":" + await reader.read())
            await writer.drain()
        finally:
            writer.close()

    return answer


def dns_entry(name: str, vip: str, hostname: str) -> list[wpb.Service | wpb.Workload]:
    """A ServiceEntry (resolution DNS) with VIP `vip` and one endpoint known by `hostname`, as istiod sends it."""
    key = f"external/{name}.example.internal"
    return [
        wpb.Service(
            name=name,
            namespace="external",
            hostname=f"{name}.example.internal",
            addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(vip).packed)],
            ports=[wpb.Port(service_port=443)],
        ),
        wpb.Workload(
            uid=f"Kubernetes/networking.istio.io/ServiceEntry/external/{name}/{hostname}",
            name=name,
            namespace="external",
            hostname=hostname,
            services={key: wpb.PortList(ports=[wpb.Port(service_port=443, target_port=SERVER_PORT)])},
        ),
    ]


async def through_proxy(agent: Agent, vip: str) -> bytes:
    captured = agent.capture_outbound((vip, 443))
    reader, writer = await asyncio.open_connection(sock=await connect_from(CLIENT_IP, captured))
    try:
        writer.write(b"hello")
        writer.write_eof()
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:  # the proxy refused (or could not connect): what the client sees
        return b""
    finally:
        writer.close()


def test_a_link_local_answer_is_dialled_on_the_link_its_scope_id_names(links: Links) -> None:
    b, c = links.index["b"], links.index["c"]
    asked: list[str] = []

    async def resolve(hostname: str) -> list[str]:
        """The made-up name answers with c's link (as a resolver gives a link-local answer: with its scope id);
        numeric hosts go to the system resolver."""
        asked.append(hostname)
        return [f"fe80::b%{c}"] if hostname == "ll.example.internal" else await system_resolve(hostname)

    async def scenario() -> dict[str, bytes]:
        servers = []
        for label, ns in links.far.items():
            with netns.enter(ns):  # the listening socket belongs to the far end's namespace
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::", SERVER_PORT))
                sock.listen()
            servers.append(await asyncio.start_server(named_server(label), sock=sock))
        agent = Agent("n1", WorkloadStore(), StaticCertificates())
        agent.outbound.resolver = OnDemandResolver(resolve)
        agent.store.put(
            [
                pod_workload("sleep-1", "client", CLIENT_IP, sa="sleep", node="n1"),
                *dns_entry("via-b", "240.240.0.1", f"fe80::b%{b}"),
                *dns_entry("via-c", "240.240.0.2", f"fe80::b%{c}"),
                *dns_entry("named", "240.240.0.3", "ll.example.internal"),
            ]
        )
        try:
            return {vip: await through_proxy(agent, vip) for vip in ("240.240.0.1", "240.240.0.2", "240.240.0.3")}
        finally:
            await agent.close()
            for server in servers:
                server.close()

    replies = run_in(links.proxy, scenario)
    assert replies == {"240.240.0.1": b"b:hello", "240.240.0.2": b"c:hello", "240.240.0.3": b"c:hello"}
    assert asked == [f"fe80::b%{b}", f"fe80::b%{c}", "ll.example.internal"]


def test_a_zoned_address_is_the_nodes_only_on_the_link_that_has_it(links: Links) -> None:
    b, c = links.index["b"], links.index["c"]
    with netns.enter(links.proxy):
        found = [is_node_address(f"fe80::a%{b}"), is_node_address(f"fe80::a%{c}"), is_node_address(f"fe80::b%{b}")]
    assert found == [True, True, False]
