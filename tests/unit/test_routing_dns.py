"""Endpoints known only by hostname (ServiceEntry `resolution: DNS`): `route` hands them on unresolved, `resolved`
puts the address in with route's address checks, and OnDemandResolver resolves them as ztunnel's on-demand DNS
(client's family preferred, random among the answers), caching per hostname for a bounded time."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from typing import Any

import pytest

from agent.addressing import socket_address
from agent.ondemand_dns import OnDemandResolver, ResolutionError, system_resolve
from agent.outbound import OutboundConfig, RouteKind, is_node_address, resolved, route
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload

VIP = "240.240.0.10"
VIP6 = "fd00:240::10"
HOST = "api.example.com"
KEY = f"external/{HOST}"
CLIENT = pod_workload("sleep-1", "client", "10.1.0.5", sa="sleep", node="n1")
NO_LOCAL = OutboundConfig(is_node_address=lambda ip: ip.startswith("127."))


def service(families: wpb.IPFamilies = wpb.DUAL) -> wpb.Service:
    return wpb.Service(
        name="api",
        namespace="external",
        hostname=HOST,
        addresses=[
            wpb.NetworkAddress(address=ipaddress.ip_address(VIP).packed),
            wpb.NetworkAddress(address=ipaddress.ip_address(VIP6).packed),
        ],
        ports=[wpb.Port(service_port=443)],
        ip_families=families,
    )


def dns_endpoint(hostname: str = HOST, *, target: int = 8443, hbone: bool = False, **kw: Any) -> wpb.Workload:
    """As istiod builds a DNS ServiceEntry's endpoint: a hostname, no address."""
    return wpb.Workload(
        uid=f"Kubernetes/networking.istio.io/ServiceEntry/external/api/{hostname}",
        name="api",
        namespace="external",
        hostname=hostname,
        tunnel_protocol=wpb.HBONE if hbone else wpb.NONE,
        services={KEY: wpb.PortList(ports=[wpb.Port(service_port=443, target_port=target)])},
        **kw,
    )


def store_with(*endpoints: wpb.Workload, families: wpb.IPFamilies = wpb.DUAL) -> WorkloadStore:
    s = WorkloadStore()
    s.put([CLIENT, service(families), *endpoints])
    return s


# ---- route: the endpoint is picked, its hostname stands where the address goes ----------------------------------


def test_a_hostname_endpoint_is_routed_as_plain_tcp_with_the_name_to_resolve() -> None:
    r = route(store_with(dns_endpoint()), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    assert (r.kind, r.hostname, r.target, r.authority) == (RouteKind.PASSTHROUGH, HOST, (HOST, 8443), None)
    assert r.workload is not None and r.workload.hostname == HOST
    assert r.service is not None and r.service.hostname == HOST


def test_a_hostname_endpoint_in_the_mesh_is_reached_over_hbone() -> None:
    r = route(store_with(dns_endpoint(hbone=True)), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    assert (r.kind, r.hostname, r.target, r.authority) == (RouteKind.HBONE, HOST, (HOST, 15008), (HOST, 8443))


def test_an_endpoint_with_neither_address_nor_hostname_is_still_no_upstream() -> None:
    r = route(store_with(dns_endpoint(hostname="")), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    assert (r.kind, r.reason) == (RouteKind.REJECT, "no_healthy_upstream")


def test_an_address_of_an_allowed_family_is_used_before_the_hostname() -> None:
    both = dns_endpoint(addresses=[ipaddress.ip_address("192.0.2.7").packed])
    r = route(store_with(both), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    assert (r.kind, r.hostname, r.target) == (RouteKind.PASSTHROUGH, "", ("192.0.2.7", 8443))
    # as ztunnel's pick_workload_destination_or_resolve: no address the service's families allow -> the hostname
    v6_only_service = store_with(both, families=wpb.IPV6_ONLY)
    r = route(v6_only_service, "n1", CLIENT, (VIP6, 443), NO_LOCAL)
    assert (r.kind, r.hostname, r.target) == (RouteKind.PASSTHROUGH, HOST, (HOST, 8443))


def test_hostname_endpoints_share_the_load_with_addressed_ones() -> None:
    addressed = pod_workload("vm-1", "external", "192.0.2.8", hbone=False, services=dns_endpoint().services)
    s = store_with(dns_endpoint(), addressed)
    rng = random.Random(7)
    seen = {route(s, "n1", CLIENT, (VIP, 443), NO_LOCAL, rng).target for _ in range(64)}
    assert seen == {(HOST, 8443), ("192.0.2.8", 8443)}


# ---- resolved: the address goes in, with route's checks on it ---------------------------------------------------


def test_resolved_puts_the_address_in_target_and_authority() -> None:
    hbone = route(store_with(dns_endpoint(hbone=True)), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    r = resolved(hbone, "203.0.113.9", NO_LOCAL)
    assert (r.kind, r.hostname, r.target, r.authority) == (
        RouteKind.HBONE,
        "",
        ("203.0.113.9", 15008),
        ("203.0.113.9", 8443),
    )
    assert r.workload is hbone.workload and r.service is hbone.service


def test_resolved_refuses_loopback_and_the_agents_own_ports_on_this_node() -> None:
    plain = route(store_with(dns_endpoint()), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    r = resolved(plain, "127.0.0.1", NO_LOCAL)
    assert (r.kind, r.reason) == (RouteKind.REJECT, "loopback_upstream")
    looping = route(store_with(dns_endpoint(target=15001)), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    node_config = OutboundConfig(is_node_address=lambda ip: ip == "10.0.0.1")
    assert resolved(looping, "10.0.0.1", node_config).reason == "self_call"
    assert resolved(looping, "10.0.0.2", node_config).target == ("10.0.0.2", 15001)  # elsewhere: a port like any


# ---- OnDemandResolver: family preference, cache, failures ------------------------------------------------------


class FakeDns:
    """Answers from a table and counts the questions; a missing name fails as getaddrinfo does."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, hostname: str) -> list[str]:
        self.calls.append(hostname)
        if self.gate is not None:
            await self.gate.wait()
        if hostname not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[hostname])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


DUAL = ["192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2"]


async def test_the_clients_family_is_preferred_at_random_among_its_answers() -> None:
    r = OnDemandResolver(FakeDns({HOST: DUAL}))
    rng = random.Random(3)
    v4 = {await r.pick(HOST, False, rng) for _ in range(40)}
    v6 = {await r.pick(HOST, True, rng) for _ in range(40)}
    assert (v4, v6) == ({"192.0.2.1", "192.0.2.2"}, {"2001:db8::1", "2001:db8::2"})


async def test_the_other_family_answers_when_the_clients_has_none() -> None:
    r = OnDemandResolver(FakeDns({"v6.example": ["2001:db8::7"], "v4.example": ["192.0.2.7"]}))
    assert await r.pick("v6.example", False) == "2001:db8::7"
    assert await r.pick("v4.example", True) == "192.0.2.7"


async def test_answers_are_cached_per_hostname_for_the_ttl() -> None:
    dns, clock = FakeDns({HOST: ["192.0.2.1"], "b.example": ["192.0.2.9"]}), Clock()
    r = OnDemandResolver(dns, ttl=30.0, clock=clock)
    for _ in range(5):
        assert await r.pick(HOST, False) == "192.0.2.1"
    assert await r.pick("b.example", False) == "192.0.2.9"
    assert dns.calls == [HOST, "b.example"]
    clock.now += 29.9
    await r.pick(HOST, False)
    assert dns.calls == [HOST, "b.example"]
    dns.table[HOST] = ["192.0.2.3"]  # the record changed: seen once the cached answer expires
    clock.now += 0.2
    assert await r.pick(HOST, False) == "192.0.2.3"
    assert dns.calls == [HOST, "b.example", HOST] and r.lookups == 3


async def test_concurrent_connections_share_one_lookup() -> None:
    dns = FakeDns({HOST: ["192.0.2.1"]})
    dns.gate = asyncio.Event()
    r = OnDemandResolver(dns)
    waiters = [asyncio.create_task(r.pick(HOST, False)) for _ in range(10)]
    await asyncio.sleep(0)
    dns.gate.set()
    assert await asyncio.gather(*waiters) == ["192.0.2.1"] * 10
    assert dns.calls == [HOST]


async def test_a_cancelled_connection_does_not_cancel_the_lookup_others_wait_for() -> None:
    dns = FakeDns({HOST: ["192.0.2.1"]})
    dns.gate = asyncio.Event()
    r = OnDemandResolver(dns)
    first, second = asyncio.create_task(r.pick(HOST, False)), asyncio.create_task(r.pick(HOST, False))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    dns.gate.set()
    assert await second == "192.0.2.1"
    assert first.cancelled() and dns.calls == [HOST]


async def test_a_name_that_does_not_resolve_fails_naming_it_and_is_not_asked_again_at_once() -> None:
    dns, clock = FakeDns({}), Clock()
    r = OnDemandResolver(dns, failure_ttl=5.0, clock=clock)
    with pytest.raises(ResolutionError, match=r"nowhere\.example: .*not known"):
        await r.pick("nowhere.example", False)
    with pytest.raises(ResolutionError):
        await r.pick("nowhere.example", False)
    assert dns.calls == ["nowhere.example"]
    dns.table["nowhere.example"] = ["192.0.2.4"]
    clock.now += 5.0
    assert await r.pick("nowhere.example", False) == "192.0.2.4"


async def test_an_empty_answer_and_a_name_libc_refuses_are_failures() -> None:
    async def refuse(hostname: str) -> list[str]:
        raise UnicodeError("label empty or too long")

    with pytest.raises(ResolutionError, match="no addresses"):
        await OnDemandResolver(FakeDns({HOST: []})).pick(HOST, False)
    with pytest.raises(ResolutionError, match="label empty"):
        await OnDemandResolver(refuse).pick("xn--zz.example", False)


async def test_a_hostname_that_is_no_dns_name_is_refused_without_a_lookup() -> None:
    # libc would cut "nul\0..." at the NUL and look up the rest; the codec refuses "a..b" itself
    dns = FakeDns({})
    r = OnDemandResolver(dns)
    # an IP literal's zone is only an interface on a link-local address; glibc looks "2001:db8::1%eth0" up as a name
    for bad in ("a..b", "nul\0.example", "*.example.com", "a b", "x" * 64 + ".example", "", "2001:db8::1%eth0"):
        with pytest.raises(ResolutionError, match="not a valid hostname"):
            await r.pick(bad, False)
    assert dns.calls == []
    dns.table.update({"_svc.example": ["192.0.2.1"], "2001:db8::1": ["2001:db8::1"]})
    assert await r.pick("_svc.example", False) == "192.0.2.1"  # underscores, IP literals: looked up
    assert await r.pick("2001:db8::1", True) == "2001:db8::1"


async def test_an_ip_literal_never_reaches_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The system resolver parses a literal itself (AI_NUMERICHOST), so no zone spelling can send it to DNS."""
    loop = asyncio.get_running_loop()
    real, seen = loop.getaddrinfo, []

    async def recording(host: str, port: Any, **kw: Any) -> Any:
        seen.append((host, kw.get("flags", 0)))
        return await real(host, port, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", recording)
    await system_resolve("fe80::1%lo")
    await system_resolve("192.0.2.7")
    await system_resolve("localhost")
    assert [(h, bool(f & socket.AI_NUMERICHOST)) for h, f in seen] == [
        ("fe80::1%lo", True),
        ("192.0.2.7", True),
        ("localhost", False),
    ]


async def test_a_lookup_that_hangs_fails_after_the_timeout() -> None:
    dns = FakeDns({HOST: ["192.0.2.1"]})
    dns.gate = asyncio.Event()  # never set
    r = OnDemandResolver(dns, timeout=0.05)
    with pytest.raises(ResolutionError, match="timed out"):
        await r.pick(HOST, False)


async def test_the_cache_is_bounded_oldest_answer_first() -> None:
    dns = FakeDns({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"], "c.example": ["192.0.2.3"]})
    r = OnDemandResolver(dns, max_entries=2)
    for name in ("a.example", "b.example", "c.example", "b.example", "c.example", "a.example"):
        await r.pick(name, False)
    assert dns.calls == ["a.example", "b.example", "c.example", "a.example"]


async def test_the_system_resolver_reads_etc_hosts() -> None:
    # localhost is in /etc/hosts (nsswitch "files" first): no DNS query leaves the machine
    assert "127.0.0.1" in await system_resolve("localhost")
    assert await OnDemandResolver().pick("localhost", False) == "127.0.0.1"


# ---- IPv6 link-local answers keep their scope id (the interface) up to the connect ------------------------------


async def test_the_system_resolver_keeps_a_link_local_answers_scope_id_and_drops_others() -> None:
    # numeric hosts: getaddrinfo parses them itself (the zone into sin6_scope_id), nothing is asked of DNS (a zone
    # by interface name is numeric only on a link-local address: "2001:db8::1%lo" would go to DNS as a name)
    lo = socket.if_nametoindex("lo")
    assert await system_resolve("fe80::1%lo") == [f"fe80::1%{lo}"]
    assert await system_resolve(f"fe80::1%{lo}") == [f"fe80::1%{lo}"]
    assert await system_resolve(f"2001:db8::1%{lo}") == ["2001:db8::1"]  # only link-local needs (or uses) one
    assert await system_resolve("fe80::1") == ["fe80::1"]


async def test_a_link_local_answer_is_picked_with_its_zone() -> None:
    r = OnDemandResolver(FakeDns({HOST: ["fe80::9%7", "192.0.2.1"]}))
    assert await r.pick(HOST, True) == "fe80::9%7"
    assert await OnDemandResolver().pick("fe80::1%lo", False) == f"fe80::1%{socket.if_nametoindex('lo')}"


def test_resolved_connects_to_the_zone_and_names_the_bare_address_to_the_peer() -> None:
    plain = route(store_with(dns_endpoint()), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    r = resolved(plain, "fe80::9%7", NO_LOCAL)
    assert (r.kind, r.target, r.authority) == (RouteKind.PASSTHROUGH, ("fe80::9%7", 8443), None)
    hbone = route(store_with(dns_endpoint(hbone=True)), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    r = resolved(hbone, "fe80::9%7", NO_LOCAL)
    # the zone is this node's interface index: the pool dials it, the peer and policy see the address alone
    assert (r.kind, r.target, r.authority) == (RouteKind.HBONE, ("fe80::9%7", 15008), ("fe80::9", 8443))


def test_a_zone_does_not_hide_loopback_and_the_node_check_sees_it() -> None:
    plain = route(store_with(dns_endpoint()), "n1", CLIENT, (VIP, 443), NO_LOCAL)
    assert resolved(plain, "::1%1", NO_LOCAL).reason == "loopback_upstream"
    asked: list[str] = []
    looping = route(store_with(dns_endpoint(target=15001)), "n1", CLIENT, (VIP, 443), NO_LOCAL)

    def on_link_2(ip: str) -> bool:
        asked.append(ip)
        return ip == "fe80::1%2"

    node_config = OutboundConfig(is_node_address=on_link_2)
    assert resolved(looping, "fe80::1%2", node_config).reason == "self_call"
    assert resolved(looping, "fe80::1%3", node_config).target == ("fe80::1%3", 15001)  # that address, other link
    assert asked == ["fe80::1%2", "fe80::1%3"]


def test_socket_address_carries_the_zone_as_the_scope_id() -> None:
    lo = socket.if_nametoindex("lo")
    assert socket_address(("fe80::1%7", 443)) == ("fe80::1", 443, 0, 7)
    assert socket_address(("fe80::1%lo", 443)) == ("fe80::1", 443, 0, lo)
    assert socket_address(("2001:db8::1", 443)) == ("2001:db8::1", 443)
    assert socket_address(("192.0.2.1", 80)) == ("192.0.2.1", 80)
    with pytest.raises(OSError):
        socket_address(("fe80::1%no-such-if0", 443))


def test_a_zoned_link_local_address_is_not_the_nodes_unless_that_link_has_it() -> None:
    # lo carries no link-local address: the kernel says EADDRNOTAVAIL for fe80::1 on it (the 2-tuple, scope 0,
    # was EINVAL, which counts as "local" in doubt and refused every zoned answer at the agent's ports)
    assert not is_node_address(f"fe80::1%{socket.if_nametoindex('lo')}")
