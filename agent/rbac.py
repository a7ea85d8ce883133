"""L4 authorization with Istio ambient's semantics (ztunnel `assert_rbac` / `Authorization::matches`).

Pure functions over the `istio.security.Authorization` protobufs the controller sends, so the exact
semantics can be checked in tables without sockets and the same code explains a decision in `ambitctl`. Each
policy is read once into a matchable form (CIDRs parsed, unset values dropped), as ztunnel converts it on
arrival: decisions are taken per connection, and again for every tracked connection at each policy update.
The order is fixed by Istio: enforced DENY first; no enforced ALLOW policy means allow; otherwise an
enforced ALLOW must match. Dry-run policies never change the outcome: what they would have done is
returned so the caller can log it.

Nesting (Istio's names): `Authorization.groups` are OR-ed, a `Group`'s `rules` are AND-ed, a `Rules`'
`matches` are OR-ed, and inside a `Match` values of one field are OR-ed and different fields AND-ed, each
field being `(no positives or any positive) and (no negatives or no negative)`. A policy with no groups
never matches, a group with no rules and a `Rules` with no matches match everything, and an empty `Match`
is skipped (it matches nothing).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.addressing import HBONE, workload_identity
from agent.state import WorkloadStore, policy_key
from common.spiffe import Identity

# Values of istio.security.Action; compared as ints so this module does not need the generated code.
ACTION_ALLOW = 0
ACTION_DENY = 1


@dataclass(frozen=True, slots=True)
class Connection:
    """What L4 policy may look at. `dst_port` is the workload's target port, never 15008."""

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: Identity | None = None
    src_port: int = 0

    def __str__(self) -> str:
        who = str(self.src_identity) if self.src_identity else "no-identity"
        return f"{self.src_ip}:{self.src_port}({who})->{self.dst_ip}:{self.dst_port}"


class Outcome(enum.Enum):
    NO_POLICIES = "allowed: no allow policies"
    ALLOWED = "allowed by policy"
    EXPLICITLY_DENIED = "denied by deny policy"
    NOT_ALLOWED = "denied: no allow policy matched"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    policy: str | None = None  # "ns/name" of the policy that decided, if one did
    dry_run: tuple[str, ...] = ()  # what dry-run policies would have done, for the log

    @property
    def allowed(self) -> bool:
        return self.outcome in (Outcome.NO_POLICIES, Outcome.ALLOWED)

    def explain(self) -> str:
        return f"{self.outcome.value} {self.policy}" if self.policy else self.outcome.value


def evaluate(policies: Iterable[Any], conn: Connection) -> Decision:
    """Decide `conn` against the destination workload's applicable policies (`store.policies_for`)."""
    peer = _Peer(conn)
    allow: list[Any] = []
    deny: list[Any] = []
    dry: list[str] = []
    dry_allows = dry_allow_matched = False
    for p in policies:
        if p.dry_run:
            if p.action == ACTION_DENY:
                if _matches(p, peer):
                    dry.append(f"dry-run: {policy_key(p)} would deny")
            elif p.action == ACTION_ALLOW:
                dry_allows = True
                if _matches(p, peer):
                    dry_allow_matched = True
                    dry.append(f"dry-run: {policy_key(p)} would allow")
            continue
        (deny if p.action == ACTION_DENY else allow).append(p)
    if dry_allows and not dry_allow_matched and not allow:
        # What a dry-run ALLOW is for: this connection would be denied once it is enforced (ztunnel's
        # "dry-run: no allow policies match").
        dry.append("dry-run: no allow policies match, would deny")
    dry_run = tuple(dry)
    for p in deny:
        if _matches(p, peer):
            return Decision(Outcome.EXPLICITLY_DENIED, policy_key(p), dry_run)
    if not allow:
        return Decision(Outcome.NO_POLICIES, None, dry_run)
    for p in allow:
        if _matches(p, peer):
            return Decision(Outcome.ALLOWED, policy_key(p), dry_run)
    return Decision(Outcome.NOT_ALLOWED, None, dry_run)


def matches(policy: Any, conn: Connection) -> bool:
    """Whether any group of `policy` matches; a policy without groups matches nothing."""
    return _matches(policy, _Peer(conn))


def _matches(policy: Any, peer: _Peer) -> bool:
    return any(_group_matches(g, peer) for g in _compiled(policy))


def _group_matches(clauses: tuple[_Clause, ...], peer: _Peer) -> bool:
    return all(clause is None or any(m.matches(peer) for m in clause) for clause in clauses)


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Ip = ipaddress.IPv4Address | ipaddress.IPv6Address

# A `Rules` (clause): its non-empty matches, of which one must hold; None for one without matches, which holds.
_Clause = tuple["_Match", ...] | None
# Policies read into their matchable form, as ztunnel converts one when it arrives: by policy key, the entry
# holding the policy object it was read from. The store replaces a policy it updates (never mutates it), so an
# entry serves while its object is the one asked about, and an update's new object takes the key's place (old
# versions do not pile up). Least recently used keys leave first past the limit.
_COMPILED: OrderedDict[str, tuple[Any, tuple[tuple[_Clause, ...], ...]]] = OrderedDict()
COMPILED_LIMIT = 4096


def _compiled(policy: Any) -> tuple[tuple[_Clause, ...], ...]:
    key = policy_key(policy)
    entry = _COMPILED.get(key)
    if entry is not None and entry[0] is policy:
        _COMPILED.move_to_end(key)
        return entry[1]
    groups = tuple(tuple(_clause(rules) for rules in group.rules) for group in policy.groups)
    _COMPILED[key] = (policy, groups)
    _COMPILED.move_to_end(key)
    if len(_COMPILED) > COMPILED_LIMIT:
        _COMPILED.popitem(last=False)
    return groups


def _clause(rules: Any) -> _Clause:
    if len(rules.matches) == 0:
        return None  # an empty clause counts as matched
    return tuple(c for c in (_compile(m) for m in rules.matches) if not c.empty)


class _Peer:
    """What the matches compare, worked out once per decision, and only if a policy asks (most connections meet
    no CIDR, and many no policy at all)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.dst_port = conn.dst_port
        ident = conn.src_identity
        self.service_account = (ident.namespace, ident.service_account) if ident else None
        self.namespace = ident.namespace if ident else None

    @functools.cached_property
    def src_ip(self) -> Ip:
        return ipaddress.ip_address(self.conn.src_ip)

    @functools.cached_property
    def dst_ip(self) -> Ip:
        return ipaddress.ip_address(self.conn.dst_ip)

    @functools.cached_property
    def principal(self) -> str | None:
        ident = self.conn.src_identity
        return ident.principal if ident else None


# A field's test of one value: (what the peer brought, the policy's value) -> holds.
_Test = Callable[[_Peer, Any], bool]


@dataclass(frozen=True, slots=True)
class _Match:
    """A `Match` with what ztunnel's conversion drops already dropped (unset StringMatch, malformed CIDR): for each
    field it sets, the field's test with its positive and negative values. Values of one field are OR-ed, the
    fields AND-ed, each being `(no positives or any positive) and (no negatives or no negative)`."""

    fields: tuple[tuple[_Test, tuple[Any, ...], tuple[Any, ...]], ...]

    @property
    def empty(self) -> bool:
        return not self.fields

    def matches(self, peer: _Peer) -> bool:
        for test, positive, negative in self.fields:
            if positive and not any(test(peer, v) for v in positive):
                return False
            if negative and any(test(peer, v) for v in negative):
                return False
        return True


def _dst_ip(peer: _Peer, net: Net) -> bool:
    return peer.dst_ip in net


def _src_ip(peer: _Peer, net: Net) -> bool:
    return peer.src_ip in net


def _port(peer: _Peer, port: int) -> bool:
    return port == peer.dst_port


def _service_account(peer: _Peer, sa: tuple[str, str]) -> bool:
    return sa == peer.service_account  # no identity: None, which no (namespace, account) equals


def _principal(peer: _Peer, sm: tuple[str, str]) -> bool:
    return peer.principal is not None and _string_holds(sm, peer.principal)


def _namespace(peer: _Peer, sm: tuple[str, str]) -> bool:
    return peer.namespace is not None and _string_holds(sm, peer.namespace)


def _compile(m: Any) -> _Match:
    # ztunnel's field order (Authorization::matches): cheap and selective ones first changes no outcome.
    fields = (
        (_dst_ip, _nets(m.destination_ips), _nets(m.not_destination_ips)),
        (_src_ip, _nets(m.source_ips), _nets(m.not_source_ips)),
        (_port, tuple(m.destination_ports), tuple(m.not_destination_ports)),
        (
            _service_account,
            tuple((s.namespace, s.serviceAccount) for s in m.service_accounts),
            tuple((s.namespace, s.serviceAccount) for s in m.not_service_accounts),
        ),
        (_principal, _strings(m.principals), _strings(m.not_principals)),
        (_namespace, _strings(m.namespaces), _strings(m.not_namespaces)),
    )
    return _Match(tuple(f for f in fields if f[1] or f[2]))


def _strings(values: Sequence[Any]) -> tuple[tuple[str, str], ...]:
    """StringMatches as (kind, value); unset ones dropped, as ztunnel's conversion does."""
    out = []
    for v in values:
        kind = v.WhichOneof("match_type")
        if kind is not None:
            out.append((kind, "" if kind == "presence" else getattr(v, kind)))
    return tuple(out)


def _nets(values: Sequence[Any]) -> tuple[Net, ...]:
    out: list[Net] = []
    for a in values:
        raw = bytes(a.address)
        if len(raw) not in (4, 16):
            continue
        try:
            out.append(ipaddress.ip_network((ipaddress.ip_address(raw), a.length), strict=False))
        except ValueError:
            continue  # prefix longer than the address: dropped, as ztunnel does
    return tuple(out)


def _string_holds(sm: tuple[str, str], value: str) -> bool:
    """istio.security.StringMatch; `presence` means any non-empty value."""
    kind, expected = sm
    if kind == "exact":
        return value == expected
    if kind == "prefix":
        return value.startswith(expected)
    if kind == "suffix":
        return value.endswith(expected)
    return kind == "presence" and value != ""


def explain(
    store: WorkloadStore,
    trust_domain: str,
    src_ip: str,
    dst: tuple[str, int],
    identity: Identity | None = None,
    *,
    plaintext: bool = False,
) -> dict[str, Any]:
    """What the destination's agent would decide for a connection from `src_ip` to `dst` (`ambitctl explain`).

    The peer identity is `identity` if given, none with `plaintext`, else the source workload's own when it is in
    the mesh (what its agent presents; a caller outside the mesh arrives in plaintext, with none). A destination
    outside the mesh is reached by passthrough, where no agent enforces policy. Raises LookupError when `dst` is no
    workload's address.
    """
    dst_wl = store.workload_by_ip(dst[0])
    if dst_wl is None:
        raise LookupError(f"{dst[0]} is not the address of any workload")
    src_wl = store.workload_by_ip(src_ip)
    if identity is None and not plaintext and src_wl is not None and src_wl.tunnel_protocol == HBONE:
        identity = workload_identity(src_wl, trust_domain)
    conn = Connection(src_ip, dst[0], dst[1], None if plaintext else identity)
    enforced = dst_wl.tunnel_protocol == HBONE
    policies = list(store.policies_for(dst_wl)) if enforced else []
    decision = evaluate(policies, conn)
    return {
        "connection": str(conn),
        "source_workload": src_wl.uid if src_wl is not None else None,
        "destination_workload": dst_wl.uid,
        "applicable_policies": [policy_key(p) + (" (dry-run)" if p.dry_run else "") for p in policies],
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.outcome.value if enforced else "allowed: the destination is not in the mesh (no policy)",
        "policy": decision.policy,
        "dry_run": list(decision.dry_run),
    }
