"""L4 authorization with Istio ambient's semantics (ztunnel `assert_rbac` / `Authorization::matches`).

Pure functions over the `istio.security.Authorization` protobufs the controller sends, so the exact
semantics can be checked in tables without sockets and the same code explains a decision in `ambitctl`. Each
policy is read once into a matchable form (CIDRs parsed, malformed entries read as below), as ztunnel converts it on
arrival: decisions are taken per connection, and again for every tracked connection at each policy update.
The order is fixed by Istio: enforced DENY first; no enforced ALLOW policy means allow; otherwise an
enforced ALLOW must match. Dry-run policies never change the outcome: what they would have done is
returned so the caller can log it.

Nesting (Istio's names): `Authorization.groups` are OR-ed, a `Group`'s `rules` are AND-ed, a `Rules`'
`matches` are OR-ed, and inside a `Match` values of one field are OR-ed and different fields AND-ed, each
field being `(no positives or any positive) and (no negatives or no negative)`. A policy with no groups
never matches, a group with no rules and a `Rules` with no matches match everything, and an empty `Match`
is skipped (it matches nothing).

Malformed entries. An IP entry that is no address (not 4 or 16 bytes) or whose prefix is longer than its address,
a port above 65535, or a StringMatch with no kind set denotes no set of peers we can know. ztunnel's conversion
(src/rbac.rs ``TryFrom<&Match> for RbacMatch``) drops such an IP entry or StringMatch alone (``filter_map(..
try_into().ok())``) and truncates a port (``*p as u16``: 65616 becomes 80); both can widen the policy: an ALLOW
``from 10.0.0.0/40 to port 80`` becomes ``to port 80`` from anyone, and an entry of ``not_source_ips`` dropped lets
that range in. Here each malformed entry is read the way that makes the policy decide the least in the peer's
favour, whatever it was meant to say: in an ALLOW an unknown positive value matches nobody (the entry is dropped; a
field left with no value makes its Match match nothing) and an unknown negative value excludes everybody (the Match
matches nothing); in a DENY an unknown positive value matches anybody (the field stops narrowing the Match, which
matches everything when nothing else is left) and an unknown negative value excludes nobody (the entry is dropped).
ANDs and ORs are monotone, so an ALLOW never admits more, and a DENY never denies less, than its author's policy
with any reading of the bad entries. :func:`malformed_entries` lists them for the xDS client to log and count.
"""

from __future__ import annotations

import enum
import ipaddress
import operator
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
MAX_PORT = 65535  # ports are 16-bit; the protos carry uint32


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
    allow: list[_Policy] = []
    deny: list[_Policy] = []
    dry: list[str] = []
    dry_allows = dry_allow_matched = False
    by_id = _BY_ID
    for p in policies:
        c = by_id.get(id(p)) or _compiled(p)
        if c.dry_run:
            if c.action == ACTION_DENY:
                if c.holds(peer):
                    dry.append(f"dry-run: {c.key} would deny")
            elif c.action == ACTION_ALLOW:
                dry_allows = True
                if c.holds(peer):
                    dry_allow_matched = True
                    dry.append(f"dry-run: {c.key} would allow")
            continue
        (deny if c.action == ACTION_DENY else allow).append(c)
    if dry_allows and not dry_allow_matched and not allow:
        # What a dry-run ALLOW is for: this connection would be denied once it is enforced (ztunnel's
        # "dry-run: no allow policies match").
        dry.append("dry-run: no allow policies match, would deny")
    dry_run = tuple(dry)
    for c in deny:
        if c.holds(peer):
            return Decision(Outcome.EXPLICITLY_DENIED, c.key, dry_run)
    if not allow:
        return Decision(Outcome.NO_POLICIES, None, dry_run)
    for c in allow:
        if c.holds(peer):
            return Decision(Outcome.ALLOWED, c.key, dry_run)
    return Decision(Outcome.NOT_ALLOWED, None, dry_run)


def matches(policy: Any, conn: Connection) -> bool:
    """Whether any group of `policy` matches; a policy without groups matches nothing."""
    return _compiled(policy).holds(_Peer(conn))


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Ip = ipaddress.IPv4Address | ipaddress.IPv6Address

# A `Rules` (clause): its non-empty matches, of which one must hold; None for one without matches, which holds.
_Clause = tuple["_Match", ...] | None


@dataclass(frozen=True, slots=True)
class _Policy:
    """A policy in its matchable form, with what a decision reads of it (attribute reads of the protobuf cost as
    much as the match itself). ``holds(peer)``: whether any group matches."""

    policy: Any  # the object it was read from
    key: str
    action: int
    dry_run: bool
    groups: tuple[tuple[_Clause, ...], ...]
    holds: Callable[[_Peer], bool]


def _holds(groups: tuple[tuple[_Clause, ...], ...]) -> Callable[[_Peer], bool]:
    """Groups OR-ed, a group's clauses AND-ed, a clause's matches OR-ed; as loops, not nested generators (a third
    of the time with 70 policies). A policy of one group, one clause, one match and one field (most are) is that
    field's test itself."""
    if len(groups) == 1 and len(groups[0]) == 1:
        clause = groups[0][0]
        if clause is not None and len(clause) == 1 and len(clause[0].fields) == 1:
            return clause[0].fields[0]

    def holds(peer: _Peer) -> bool:
        for clauses in groups:
            for clause in clauses:
                if clause is None:
                    continue
                for m in clause:
                    if m.matches(peer):
                        break
                else:
                    break  # no match of this clause holds: nor does the group
            else:
                return True
        return False

    return holds


# Policies read into their matchable form, as ztunnel converts one when it arrives: by policy key, the entry
# holding the policy object it was read from. The store replaces a policy it updates (never mutates it), so an
# entry serves while its object is the one asked about, and an update's new object takes the key's place (old
# versions do not pile up). The oldest keys leave first past the limit. _BY_ID finds an entry from the object
# without formatting its key (~0.5 us a policy, per decision): it holds exactly the objects of _COMPILED's entries,
# which keep them alive, so an id there is never a recycled one.
_COMPILED: OrderedDict[str, _Policy] = OrderedDict()
_BY_ID: dict[int, _Policy] = {}
COMPILED_LIMIT = 4096


def _compiled(policy: Any) -> _Policy:
    found = _BY_ID.get(id(policy))
    if found is not None:
        return found
    key = policy_key(policy)
    deny = policy.action == ACTION_DENY
    groups = tuple(tuple(_clause(rules, deny) for rules in group.rules) for group in policy.groups)
    made = _Policy(policy, key, policy.action, policy.dry_run, groups, _holds(groups))
    old = _COMPILED.pop(key, None)
    if old is not None:
        _BY_ID.pop(id(old.policy), None)
    _COMPILED[key] = made
    _BY_ID[id(policy)] = made
    if len(_COMPILED) > COMPILED_LIMIT:
        _, evicted = _COMPILED.popitem(last=False)
        _BY_ID.pop(id(evicted.policy), None)
    return made


def _clause(rules: Any, deny: bool) -> _Clause:
    if len(rules.matches) == 0:
        return None  # an empty clause counts as matched
    return tuple(c for c in (_compile(m, deny) for m in rules.matches) if c is not None)


class _Peer:
    """What the matches compare, worked out once per decision, and only if a policy asks (most connections meet
    no CIDR, and many no policy at all). Plain properties over slots: functools.cached_property takes a lock per
    read on Python 3.11."""

    __slots__ = (
        "_dst_ip",
        "_dst_ip_bits",
        "_principal",
        "_src_ip",
        "_src_ip_bits",
        "conn",
        "dst_port",
        "namespace",
        "service_account",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.dst_port = conn.dst_port
        ident = conn.src_identity
        self.service_account = (ident.namespace, ident.service_account) if ident else None
        self.namespace = ident.namespace if ident else None
        self._src_ip: Ip | None = None
        self._dst_ip: Ip | None = None
        self._src_ip_bits: tuple[int, int] | None = None
        self._dst_ip_bits: tuple[int, int] | None = None
        self._principal: str | bool | None = False  # False: not worked out yet

    @property
    def src_ip(self) -> Ip:
        if self._src_ip is None:
            self._src_ip = ipaddress.ip_address(self.conn.src_ip)
        return self._src_ip

    @property
    def dst_ip(self) -> Ip:
        if self._dst_ip is None:
            self._dst_ip = ipaddress.ip_address(self.conn.dst_ip)
        return self._dst_ip

    @property
    def src_ip_bits(self) -> tuple[int, int]:
        """(address length in bits, the address as an integer)."""
        if self._src_ip_bits is None:
            ip = self.src_ip
            self._src_ip_bits = (ip.max_prefixlen, int(ip))
        return self._src_ip_bits

    @property
    def dst_ip_bits(self) -> tuple[int, int]:
        if self._dst_ip_bits is None:
            ip = self.dst_ip
            self._dst_ip_bits = (ip.max_prefixlen, int(ip))
        return self._dst_ip_bits

    @property
    def principal(self) -> str | None:
        if self._principal is False:
            ident = self.conn.src_identity
            self._principal = ident.principal if ident else None
        return self._principal  # type: ignore[return-value]


# Whether any of a field's values holds for the peer; made once per policy from those values.
_Test = Callable[[_Peer], bool]
_Parse = Callable[[Sequence[Any]], tuple[tuple[Any, ...], int]]


@dataclass(frozen=True, slots=True)
class _Match:
    """A `Match` with its malformed entries read as the module docstring says: for each field left, one test of
    its positive and negative values. Values of one field are OR-ed, the fields AND-ed, each being `(no
    positives or any positive) and (no negatives or no negative)`; with no field left (a DENY's malformed values
    only) it matches everything."""

    fields: tuple[_Test, ...]

    def matches(self, peer: _Peer) -> bool:
        for holds in self.fields:  # noqa: SIM110 (a loop: all() over a generator costs more per decision)
            if not holds(peer):
                return False
        return True


def _field_test(positive: _Test | None, negative: _Test | None) -> _Test:
    if negative is None:
        assert positive is not None
        return positive
    if positive is None:
        return lambda peer: not negative(peer)
    return lambda peer: positive(peer) and not negative(peer)


def _any_ip(attribute: str) -> Callable[[tuple[Net, ...]], _Test]:
    """CIDRs on the peer's `attribute` address, compared as integers: (bits, address >> host bits) against each
    network's (ipaddress's ``in`` cost ~1 us a network; a namespace's DENY policies often list one each)."""
    get = operator.attrgetter(attribute)

    def make(nets: tuple[Net, ...]) -> _Test:
        keys = tuple(
            (n.max_prefixlen, int(n.network_address) >> (n.max_prefixlen - n.prefixlen), n.max_prefixlen - n.prefixlen)
            for n in nets
        )
        if len(keys) == 1:
            ((bits, base, shift),) = keys

            def one(peer: _Peer) -> bool:
                peer_bits, value = get(peer)
                return peer_bits == bits and value >> shift == base

            return one

        def holds(peer: _Peer) -> bool:
            peer_bits, value = get(peer)
            for bits, base, shift in keys:  # noqa: SIM110 (a loop: cheaper than any() over a generator)
                if peer_bits == bits and value >> shift == base:
                    return True
            return False

        return holds

    return make


def _any_port(ports: tuple[int, ...]) -> _Test:
    wanted = frozenset(ports)
    return lambda peer: peer.dst_port in wanted


def _any_service_account(accounts: tuple[tuple[str, str], ...]) -> _Test:
    wanted = frozenset(accounts)  # no identity: None, which no (namespace, account) equals
    return lambda peer: peer.service_account in wanted


def _any_string(attribute: str) -> Callable[[tuple[tuple[str, str], ...]], _Test]:
    """StringMatches on the peer's `attribute` (absent with no identity: then none holds); exact values are looked
    up in a set, the others tried in turn."""
    get = operator.attrgetter(attribute)

    def make(values: tuple[tuple[str, str], ...]) -> _Test:
        exact = frozenset(v for kind, v in values if kind == "exact")
        others = tuple(sm for sm in values if sm[0] != "exact")

        def holds(peer: _Peer) -> bool:
            value = get(peer)
            if value is None:
                return False
            return value in exact or any(_string_holds(sm, value) for sm in others)

        return holds

    return make


# (positive field, negative field, test maker, parse) in ztunnel's field order (Authorization::matches): cheap and
# selective ones first changes no outcome.
_FIELDS: tuple[tuple[str, str, Callable[[Any], _Test], _Parse], ...]


def _compile(m: Any, deny: bool) -> _Match | None:
    """The matchable form of Match ``m`` of an ALLOW (``deny`` False) or a DENY policy; None when it matches
    nothing: empty (ztunnel skips it) or, in an ALLOW, made so by a malformed entry."""
    fields = []
    empty = True
    for positive_field, negative_field, make, parse in _FIELDS:
        positive, positive_bad = parse(getattr(m, positive_field))
        negative, negative_bad = parse(getattr(m, negative_field))
        if positive or negative or positive_bad or negative_bad:
            empty = False
        if positive_bad:
            if deny:
                positive = ()  # an unknown value matches anybody: the field no longer narrows the DENY
            elif not positive:
                return None  # only unknown values, which match nobody: neither does the ALLOW's Match
        if negative_bad and not deny:
            return None  # an unknown exclusion excludes everybody from the ALLOW's Match
        if positive or negative:
            fields.append(_field_test(make(positive) if positive else None, make(negative) if negative else None))
    return None if empty else _Match(tuple(fields))


def _strings(values: Sequence[Any]) -> tuple[tuple[tuple[str, str], ...], int]:
    """StringMatches as (kind, value); an unset one (no exact, prefix, suffix or presence) is a malformed entry
    (ztunnel's conversion drops it, which widens an ALLOW as a dropped address does)."""
    out = []
    for v in values:
        kind = v.WhichOneof("match_type")
        if kind is not None:
            out.append((kind, "" if kind == "presence" else getattr(v, kind)))
    return tuple(out), len(values) - len(out)


def _service_accounts(values: Sequence[Any]) -> tuple[tuple[tuple[str, str], ...], int]:
    return tuple((s.namespace, s.serviceAccount) for s in values), 0


def parse_net(entry: Any) -> Net | None:
    """An `istio.security.Address` as a network, or None when malformed: not 4 or 16 bytes, or a prefix longer than
    the address (ztunnel's IpNet::new refuses it; its ``length as u8`` would first wrap 288 to 32, not done here)."""
    raw = bytes(entry.address)
    if len(raw) not in (4, 16) or entry.length > len(raw) * 8:
        return None
    return ipaddress.ip_network((ipaddress.ip_address(raw), entry.length), strict=False)


def _nets(values: Sequence[Any]) -> tuple[tuple[Net, ...], int]:
    out = tuple(n for n in (parse_net(a) for a in values) if n is not None)
    return out, len(values) - len(out)


def _ports(values: Sequence[int]) -> tuple[tuple[int, ...], int]:
    out = tuple(p for p in values if p <= MAX_PORT)
    return out, len(values) - len(out)


_FIELDS = (
    ("destination_ips", "not_destination_ips", _any_ip("dst_ip_bits"), _nets),
    ("source_ips", "not_source_ips", _any_ip("src_ip_bits"), _nets),
    ("destination_ports", "not_destination_ports", _any_port, _ports),
    ("service_accounts", "not_service_accounts", _any_service_account, _service_accounts),
    ("principals", "not_principals", _any_string("principal"), _strings),
    ("namespaces", "not_namespaces", _any_string("namespace"), _strings),
)


@dataclass(frozen=True, slots=True)
class MalformedEntry:
    """One entry of a policy that :func:`malformed_entries` found malformed, and how it is read."""

    path: str  # e.g. "groups[0].rules[1].matches[0].source_ips[2]"
    field: str  # e.g. "source_ips"
    value: str  # what it holds, e.g. "address of 3 bytes", "10.0.0.0/40", "70000"
    reading: str  # what evaluation makes of it

    def __str__(self) -> str:
        return f"{self.path} ({self.value}): {self.reading}"


def _describe_net(entry: Any) -> str:
    raw = bytes(entry.address)
    if len(raw) not in (4, 16):
        return f"address of {len(raw)} bytes"
    return f"{ipaddress.ip_address(raw)}/{entry.length}"


def malformed_entries(policy: Any) -> list[MalformedEntry]:
    """The IP entries and ports of ``policy`` that denote nothing we can know, each with its reading (module
    docstring); empty for a well-formed policy."""
    deny = policy.action == ACTION_DENY
    out: list[MalformedEntry] = []
    for g, group in enumerate(policy.groups):
        for r, rules in enumerate(group.rules):
            for i, m in enumerate(rules.matches):
                present = {fd.name: values for fd, values in m.ListFields()}  # one call: most fields are empty
                where = f"groups[{g}].rules[{r}].matches[{i}]"
                for positive_field, negative_field, _test, parse in _FIELDS:
                    for name, positive in ((positive_field, True), (negative_field, False)):
                        values = present.get(name)
                        if not values or not _any_malformed(parse, values):  # the common case, without parsing
                            continue
                        good, _bad = parse(values)
                        reading = _reading(deny, positive, bool(good))
                        for j, v in enumerate(values):
                            what = _malformed(v)
                            if what is not None:
                                out.append(MalformedEntry(f"{where}.{name}[{j}]", name, what, reading))
    return out


def _any_malformed(parse: _Parse, values: Sequence[Any]) -> bool:
    """Whether ``values`` (read by ``parse``) hold a malformed entry: :func:`malformed_entries`'s quick look (the
    xDS client lists them for every policy it receives; parsing each address into a network cost ~3 us)."""
    if parse is _ports:
        return any(p > MAX_PORT for p in values)
    if parse is _strings:
        return any(v.WhichOneof("match_type") is None for v in values)
    if parse is _nets:
        return any(len(a.address) not in (4, 16) or a.length > len(a.address) * 8 for a in values)
    if parse is _service_accounts:
        return False  # no malformed form
    return bool(parse(values)[1])


def _malformed(value: Any) -> str | None:
    """What is wrong with one entry of a Match field (a port, an Address or a StringMatch), or None."""
    if isinstance(value, int):
        return str(value) if value > MAX_PORT else None
    if value.DESCRIPTOR.name == "StringMatch":
        return "unset StringMatch" if value.WhichOneof("match_type") is None else None
    return None if parse_net(value) is not None else _describe_net(value)


def _reading(deny: bool, positive: bool, others: bool) -> str:
    if deny:
        return "read as any value: the field no longer narrows this DENY" if positive else "dropped"
    if positive and others:
        return "dropped (the field's other values still apply)"
    return "this Match of the ALLOW matches nothing"


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
