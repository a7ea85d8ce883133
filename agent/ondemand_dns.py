"""On-demand DNS: addresses for service endpoints known only by hostname (a ServiceEntry with `resolution: DNS`,
whose endpoints istiod sends as workloads carrying `hostname` and no address).

As ztunnel's `resolve_on_demand_dns` (src/state.rs): the hostname is resolved when a connection picks that
endpoint, an address of the client's family (that of the address it dialled) is preferred, chosen at random among
the answers, and one of the other family is used when there is none; a failed or empty lookup refuses the
connection. ztunnel's resolver (hickory, configured from resolv.conf) caches each answer for its record TTL. The
system resolver reached through `getaddrinfo` (so /etc/hosts, nsswitch and resolv.conf apply, as they do to the
pod's own lookups) reports no TTL, so answers are kept for a short fixed time instead (`ttl`, 30 s by default,
`--dns-ttl`), and failures for less (`failure_ttl`, `--dns-failure-ttl`), so a name that does not resolve is not
asked again for every connection. Lookups run off the event loop (`loop.getaddrinfo` uses the executor),
concurrent connections to one hostname share one lookup, and a lookup that outlasts `timeout` (`--dns-timeout`)
fails rather than holding its connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.sockets import canonical_ip

# A DNS name (labels of letters, digits, '-' and '_'; 253 characters at most, a final dot allowed). Anything else in
# a workload's hostname is refused before it reaches libc, which would cut it at a NUL and look up the rest.
_NAME = re.compile(
    r"(?=[^\n]{1,253}$)(?:[A-Za-z0-9_](?:[-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?\.?"
)

# The agent's defaults (AgentConfig's --dns-ttl, --dns-failure-ttl, --dns-timeout), in seconds.
ANSWER_TTL = 30.0
FAILURE_TTL = 5.0
LOOKUP_TIMEOUT = 5.0

# hostname -> its addresses (IP text; IPv6 link-local with its zone, `fe80::1%3`); raises OSError
# (socket.gaierror) when the name does not resolve
ResolveFunction = Callable[[str], Awaitable[list[str]]]


class ResolutionError(Exception):
    """A hostname that gave no usable address: the connection that picked it is refused."""


async def system_resolve(hostname: str) -> list[str]:
    """The host's resolver, as the pod's own lookups would go: getaddrinfo in the loop's executor.

    An IPv6 link-local answer keeps its scope id as a zone (`fe80::1%3`, RFC 4007's text form; the interface
    index, as Rust's SocketAddrV6 in ztunnel keeps it): without it the address names no interface and connecting
    to it fails (EINVAL). Other addresses need none, and the kernel ignores one, so theirs is dropped."""
    # An IP literal resolves to itself, without DNS: glibc reads a zone only on link-local addresses and would
    # otherwise look `2001:db8::1%eth0` up as a name, on the node's nameserver.
    flags = socket.AI_NUMERICHOST if _is_ip_literal(hostname) else 0
    infos = await asyncio.get_running_loop().getaddrinfo(hostname, None, type=socket.SOCK_STREAM, flags=flags)
    out: dict[str, None] = {}
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = canonical_ip(str(sockaddr[0]))
        if len(sockaddr) == 4 and sockaddr[3] and ":" in ip and ipaddress.IPv6Address(ip).is_link_local:
            ip = f"{ip}%{sockaddr[3]}"
        out[ip] = None
    return list(out)


def valid_hostname(name: str) -> bool:
    """A DNS name, or an IP literal (which resolves to itself). A zone only on an IPv6 link-local address: on any
    other it names nothing the kernel uses."""
    if _NAME.fullmatch(name):
        return True
    if not _is_ip_literal(name):
        return False
    return "%" not in name or ipaddress.IPv6Address(name).is_link_local


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Answer:
    addresses: tuple[str, ...]
    error: str  # set when the lookup failed (addresses then empty)
    expires: float


class OnDemandResolver:
    """Resolves endpoint hostnames for the outbound proxy, with a bounded per-hostname cache."""

    def __init__(
        self,
        resolve: ResolveFunction = system_resolve,
        *,
        ttl: float = ANSWER_TTL,
        failure_ttl: float = FAILURE_TTL,
        timeout: float = LOOKUP_TIMEOUT,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.timeout = timeout
        self.max_entries = max_entries
        self._clock = clock
        self._cache: dict[str, _Answer] = {}
        self._inflight: dict[str, asyncio.Task[_Answer]] = {}
        self.lookups = 0  # lookups made (not answered from the cache): what the cache saves shows here

    async def addresses(self, hostname: str) -> tuple[str, ...]:
        """Every address `hostname` resolves to; ResolutionError when it does not resolve or gives none."""
        if not valid_hostname(hostname):
            raise ResolutionError(f"{hostname!r}: not a valid hostname")
        answer = self._cache.get(hostname)
        if answer is None or answer.expires <= self._clock():
            task = self._inflight.get(hostname)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._lookup(hostname))
                self._inflight[hostname] = task
            # shielded: a connection cancelled while it waits must not cancel the lookup others share
            answer = await asyncio.shield(task)
        if answer.error:
            raise ResolutionError(answer.error)
        return answer.addresses

    async def pick(self, hostname: str, want_v6: bool, rng: Any = random) -> str:
        """One address of `hostname` for a client that dialled an IPv6 (`want_v6`) or IPv4 address: of that
        family when there is one, at random (ztunnel's choice), else of the other."""
        found = await self.addresses(hostname)
        same = [ip for ip in found if (":" in ip) == want_v6]
        return str(rng.choice(same or list(found)))

    async def _lookup(self, hostname: str) -> _Answer:
        """Never raises (nobody may be left to retrieve the exception): failures become cached answers too."""
        self.lookups += 1
        try:
            async with asyncio.timeout(self.timeout):
                found = tuple(await self._resolve(hostname))
            error = "" if found else f"{hostname}: no addresses"
        except TimeoutError:
            found, error = (), f"{hostname}: lookup timed out after {self.timeout:g} s"
        except (OSError, UnicodeError, ValueError) as e:  # gaierror; a name the codec or libc refuses
            found, error = (), f"{hostname}: {e}"
        finally:
            self._inflight.pop(hostname, None)
        answer = _Answer(found, error, self._clock() + (self.failure_ttl if error else self.ttl))
        self._store(hostname, answer)
        return answer

    def _store(self, hostname: str, answer: _Answer) -> None:
        cache = self._cache
        cache.pop(hostname, None)
        if len(cache) >= self.max_entries:
            now = self._clock()
            for name in [n for n, a in cache.items() if a.expires <= now]:
                del cache[name]
            while len(cache) >= self.max_entries:  # the oldest answers go first
                del cache[next(iter(cache))]
        cache[hostname] = answer
