"""L4 authorization with Istio ambient's semantics (ztunnel `assert_rbac` / `Authorization::matches`).

Pure functions over the `istio.security.Authorization` protobufs the controller sends, so the exact
semantics can be checked in tables without sockets and the same code explains a decision in `ambitctl`.
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
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.addressing import HBONE, workload_identity
from agent.state import WorkloadStore, policy_key
from common.spiffe import Identity

T = TypeVar("T")

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
    allow: list[Any] = []
    deny: list[Any] = []
    dry: list[str] = []
    dry_allows = dry_allow_matched = False
    for p in policies:
        if p.dry_run:
            if p.action == ACTION_DENY:
                if matches(p, conn):
                    dry.append(f"dry-run: {policy_key(p)} would deny")
            elif p.action == ACTION_ALLOW:
                dry_allows = True
                if matches(p, conn):
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
        if matches(p, conn):
            return Decision(Outcome.EXPLICITLY_DENIED, policy_key(p), dry_run)
    if not allow:
        return Decision(Outcome.NO_POLICIES, None, dry_run)
    for p in allow:
        if matches(p, conn):
            return Decision(Outcome.ALLOWED, policy_key(p), dry_run)
    return Decision(Outcome.NOT_ALLOWED, None, dry_run)


def matches(policy: Any, conn: Connection) -> bool:
    """Whether any group of `policy` matches; a policy without groups matches nothing."""
    return any(_group_matches(g, conn) for g in policy.groups)


def _group_matches(group: Any, conn: Connection) -> bool:
    for rules in group.rules:
        if len(rules.matches) == 0:
            continue  # an empty clause counts as matched
        compiled = (_compile(m) for m in rules.matches)
        if not any(c.matches(conn) for c in compiled if not c.empty):
            return False
    return True


Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class _Match:
    """A `Match` with what ztunnel's conversion drops already dropped (unset StringMatch, malformed CIDR)."""

    namespaces: list[Any]
    not_namespaces: list[Any]
    service_accounts: list[tuple[str, str]]
    not_service_accounts: list[tuple[str, str]]
    principals: list[Any]
    not_principals: list[Any]
    source_ips: list[Net]
    not_source_ips: list[Net]
    destination_ips: list[Net]
    not_destination_ips: list[Net]
    destination_ports: list[int]
    not_destination_ports: list[int]

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f) for f in self.__slots__)

    def matches(self, conn: Connection) -> bool:
        ident = conn.src_identity
        sa = (ident.namespace, ident.service_account) if ident else None
        return (
            _field(self.destination_ips, self.not_destination_ips, lambda n: ipaddress.ip_address(conn.dst_ip) in n)
            and _field(self.source_ips, self.not_source_ips, lambda n: ipaddress.ip_address(conn.src_ip) in n)
            and _field(self.destination_ports, self.not_destination_ports, lambda p: p == conn.dst_port)
            and _field(self.service_accounts, self.not_service_accounts, lambda s: s == sa)
            and _field(
                self.principals,
                self.not_principals,
                lambda s: ident is not None and string_matches(s, ident.principal),
            )
            and _field(
                self.namespaces,
                self.not_namespaces,
                lambda s: ident is not None and string_matches(s, ident.namespace),
            )
        )


def _compile(m: Any) -> _Match:
    return _Match(
        namespaces=_strings(m.namespaces),
        not_namespaces=_strings(m.not_namespaces),
        service_accounts=[(s.namespace, s.serviceAccount) for s in m.service_accounts],
        not_service_accounts=[(s.namespace, s.serviceAccount) for s in m.not_service_accounts],
        principals=_strings(m.principals),
        not_principals=_strings(m.not_principals),
        source_ips=_nets(m.source_ips),
        not_source_ips=_nets(m.not_source_ips),
        destination_ips=_nets(m.destination_ips),
        not_destination_ips=_nets(m.not_destination_ips),
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports),
    )


def _field(positive: Sequence[T], negative: Sequence[T], pred: Callable[[T], bool]) -> bool:
    pos = not positive or any(pred(v) for v in positive)
    neg = not negative or not any(pred(v) for v in negative)
    return pos and neg


def _strings(values: Sequence[Any]) -> list[Any]:
    return [v for v in values if v.WhichOneof("match_type")]


def _nets(values: Sequence[Any]) -> list[Net]:
    out: list[Net] = []
    for a in values:
        raw = bytes(a.address)
        if len(raw) not in (4, 16):
            continue
        try:
            out.append(ipaddress.ip_network((ipaddress.ip_address(raw), a.length), strict=False))
        except ValueError:
            continue  # prefix longer than the address: dropped, as ztunnel does
    return out


def string_matches(sm: Any, value: str) -> bool:
    """istio.security.StringMatch; `presence` means any non-empty value."""
    kind = sm.WhichOneof("match_type")
    if kind == "exact":
        return bool(value == sm.exact)
    if kind == "prefix":
        return value.startswith(sm.prefix)
    if kind == "suffix":
        return value.endswith(sm.suffix)
    if kind == "presence":
        return value != ""
    return False


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
