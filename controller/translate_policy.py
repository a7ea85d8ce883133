"""AuthorizationPolicy and PeerAuthentication to the L4 `istio.security.Authorization` a node agent enforces.

Pure functions, no indexes: controller/translate.py decides when to call them. The semantics follow istiod's
ambient conversion (shared/reference/istio-ambient.md sections 4.1-4.5): only ALLOW and DENY exist at L4; inside an
ALLOW policy a rule that needs HTTP attributes is dropped (the policy still exists, so it denies more than asked);
inside a DENY policy the HTTP parts are removed and the L4 remainder is enforced. PeerAuthentication becomes the
static `istio_converted_static_strict` DENY policy plus, for workload policies with port-level mTLS,
`converted_peer_authentication_<name>`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import empty_pb2

from api.istio.security import authorization_pb2 as pb
from controller.model import AuthorizationPolicy, Operation, PeerAuthentication, Rule, Source
from controller.validation import L4_WHEN_KEYS, is_decimal

STATIC_STRICT_NAME = "istio_converted_static_strict"
CONVERTED_PA_PREFIX = "converted_peer_authentication_"

_MORE_RESTRICTIVE = "This is more restrictive than requested."
_HTTP_BOILERPLATE_ALLOW = f"Within an ALLOW policy, rules matching HTTP attributes are omitted. {_MORE_RESTRICTIVE}"
_HTTP_BOILERPLATE_DENY = f"The DENY policy is enforced without its HTTP rules. {_MORE_RESTRICTIVE}"
# A DENY rule whose HTTP parts leave a clause of empty matches (an operation without ports, an HTTP `when`) never
# matches: agents skip empty matches, as ztunnel does. istiod's httpDenyNoEffectBoilerplate case.
_HTTP_BOILERPLATE_DENY_NO_EFFECT = (
    "Without its HTTP rules the DENY policy has nothing left to match, so it has no effect. "
    "This is less restrictive than requested."
)
_HTTP_DENY_PARTLY = "The DENY policy is enforced without its HTTP rules, which is more restrictive than requested; "
_HTTP_DENY_DEAD_RULES = "its rules that have nothing left to match without them have no effect"
# A from/to entry with only HTTP attributes is an empty match, skipped beside the others: "POST anywhere, or port
# 22" denies port 22 only. istiod's httpDenyMixedBoilerplate calls that more restrictive, which it is not.
_HTTP_DENY_VOIDED_ENTRIES = "its from/to entries that hold only HTTP attributes match nothing"


NO_WAYPOINT_WARNING = (
    "bound to a waypoint with targetRef(s), which only a waypoint enforces; no waypoint is programmed with "
    "AuthorizationPolicies yet, so the policy has no effect"
)


@dataclass(frozen=True, slots=True)
class Converted:
    """Result of converting one AuthorizationPolicy: the resource (None if not sent) and a warning (or "")."""

    authorization: pb.Authorization | None
    warning: str = ""


def _presence() -> pb.StringMatch:
    return pb.StringMatch(presence=empty_pb2.Empty())


def string_matches(values: Iterable[str]) -> list[pb.StringMatch]:
    """Istio's user-string compilation: `*` presence, `*x` suffix, `x*` prefix, else exact."""
    out = []
    for value in values:
        if value == "*":
            out.append(_presence())
        elif value.startswith("*"):
            out.append(pb.StringMatch(suffix=value[1:]))
        elif value.endswith("*"):
            out.append(pb.StringMatch(prefix=value[:-1]))
        else:
            out.append(pb.StringMatch(exact=value))
    return out


def service_account_matches(values: Iterable[str], policy_namespace: str) -> list[pb.ServiceAccountMatch]:
    out = []
    for value in values:
        ns, sep, sa = value.partition("/")
        out.append(pb.ServiceAccountMatch(namespace=ns, serviceAccount=sa) if sep else _sa(policy_namespace, value))
    return out


def _sa(namespace: str, account: str) -> pb.ServiceAccountMatch:
    return pb.ServiceAccountMatch(namespace=namespace, serviceAccount=account)


def address_matches(values: Iterable[str]) -> list[pb.Address]:
    out = []
    for value in values:
        try:
            if "/" in value:
                net = ipaddress.ip_network(value, strict=False)
                # Keep the address as written (like Go's netip.ParsePrefix), not the masked network.
                addr = ipaddress.ip_address(value.split("/", 1)[0])
                out.append(pb.Address(address=addr.packed, length=net.prefixlen))
            else:
                addr = ipaddress.ip_address(value)
                out.append(pb.Address(address=addr.packed, length=addr.max_prefixlen))
        except ValueError:
            continue  # validation rejects these; skip like istiod does
    return out


def port_numbers(values: Iterable[str | int]) -> list[int]:
    out = []
    for value in values:
        text = str(value)
        if is_decimal(text) and int(text) <= 65535:
            out.append(int(text))
    return out


def _http_operation_fields(op: Operation) -> list[str]:
    pairs = (
        ("hosts", op.hosts),
        ("notHosts", op.not_hosts),
        ("methods", op.methods),
        ("notMethods", op.not_methods),
        ("paths", op.paths),
        ("notPaths", op.not_paths),
    )
    return [name for name, values in pairs if values]


def _http_source_fields(src: Source) -> list[str]:
    pairs = (
        ("remoteIpBlocks", src.remote_ip_blocks),
        ("notRemoteIpBlocks", src.not_remote_ip_blocks),
        ("requestPrincipals", src.request_principals),
        ("notRequestPrincipals", src.not_request_principals),
    )
    return [name for name, values in pairs if values]


def _convert_rule(action: int, rule: Rule, namespace: str) -> tuple[list[pb.Rules] | None, set[str]]:
    """One policy rule -> the AND-ed clauses of one group, or None when an ALLOW rule needs HTTP attributes."""
    http_fields: set[str] = set(rule.unsupported)  # not evaluable by the agent either: handled the same way
    clauses: list[pb.Rules] = []
    to_matches = []
    for op in rule.to:
        http_fields.update(_http_operation_fields(op))
        to_matches.append(
            pb.Match(destination_ports=port_numbers(op.ports), not_destination_ports=port_numbers(op.not_ports))
        )
    from_matches = []
    for src in rule.from_:
        http_fields.update(_http_source_fields(src))
        from_matches.append(
            pb.Match(
                source_ips=address_matches(src.ip_blocks),
                not_source_ips=address_matches(src.not_ip_blocks),
                namespaces=string_matches(src.namespaces),
                not_namespaces=string_matches(src.not_namespaces),
                service_accounts=service_account_matches(src.service_accounts, namespace),
                not_service_accounts=service_account_matches(src.not_service_accounts, namespace),
                principals=string_matches(src.principals),
                not_principals=string_matches(src.not_principals),
            )
        )
    if to_matches:
        clauses.append(pb.Rules(matches=to_matches))
    if from_matches:
        clauses.append(pb.Rules(matches=from_matches))
    for cond in rule.when:
        if cond.key not in L4_WHEN_KEYS:
            http_fields.add(cond.key)
        # An HTTP-only condition leaves an empty Match, which an agent treats as "does not match".
        clauses.append(pb.Rules(matches=[_when_match(cond.key, cond.values, cond.not_values)]))
    if action == pb.ALLOW and http_fields:
        return None, http_fields
    return clauses, http_fields


def _can_match(clauses: Sequence[pb.Rules]) -> bool:
    """False when some clause holds matches but only empty ones: agents skip those, so the rule never matches."""
    return all(not c.matches or any(m.ByteSize() for m in c.matches) for c in clauses)


def _has_voided_entry(clauses: Sequence[pb.Rules]) -> bool:
    """Whether some clause holds an empty match (skipped by agents) beside others."""
    return any(not m.ByteSize() for c in clauses for m in c.matches)


def _when_match(key: str, values: Sequence[str], not_values: Sequence[str]) -> pb.Match:
    if key == "source.namespace":
        return pb.Match(namespaces=string_matches(values), not_namespaces=string_matches(not_values))
    if key == "source.principal":
        return pb.Match(principals=string_matches(values), not_principals=string_matches(not_values))
    if key == "source.ip":
        return pb.Match(source_ips=address_matches(values), not_source_ips=address_matches(not_values))
    if key == "destination.ip":
        return pb.Match(destination_ips=address_matches(values), not_destination_ips=address_matches(not_values))
    if key == "destination.port":
        return pb.Match(destination_ports=port_numbers(values), not_destination_ports=port_numbers(not_values))
    return pb.Match()


def sent_to_agents(policy: AuthorizationPolicy) -> bool:
    """Waypoint-bound (targetRefs) and AUDIT/CUSTOM policies are never sent to node agents."""
    return not policy.has_target_refs and policy.action in ("ALLOW", "DENY")


def convert_authorization_policy(policy: AuthorizationPolicy, root_namespace: str) -> Converted:
    if policy.has_target_refs:
        # Bound to a waypoint; Ambit's waypoint (waypoint/) is not programmed from these yet, so say it.
        return Converted(None, NO_WAYPOINT_WARNING)
    if policy.action not in ("ALLOW", "DENY"):
        return Converted(None, f"action {policy.action} is not supported by the L4 agent; the policy is not enforced")
    action = pb.ALLOW if policy.action == "ALLOW" else pb.DENY
    namespace = policy.meta.namespace
    if policy.selector is not None:
        scope = pb.WORKLOAD_SELECTOR
    else:
        scope = pb.GLOBAL if namespace == root_namespace else pb.NAMESPACE
    groups = []
    http_fields: set[str] = set()
    # DENY rules with HTTP attributes, by whether their L4 rest can match, and live ones missing an alternative
    dead_http_rules = live_http_rules = voided_http_rules = 0
    for rule in policy.rules:
        clauses, found = _convert_rule(action, rule, namespace)
        http_fields |= found
        if clauses is not None:
            groups.append(pb.Group(rules=clauses))
            if found and _can_match(clauses):
                live_http_rules += 1
                voided_http_rules += _has_voided_entry(clauses)
            elif found:
                dead_http_rules += 1
    warning = ""
    if action == pb.DENY and not policy.rules:
        # Istio's webhook refuses it; it reads like "deny everything" but matches nothing.
        warning = "a DENY policy without rules never matches; add an empty rule {} to deny every connection"
    if http_fields:
        if action == pb.ALLOW:
            boilerplate = _HTTP_BOILERPLATE_ALLOW
        elif not live_http_rules:
            boilerplate = _HTTP_BOILERPLATE_DENY_NO_EFFECT
        elif dead_http_rules or voided_http_rules:
            less = [_HTTP_DENY_DEAD_RULES] if dead_http_rules else []
            less += [_HTTP_DENY_VOIDED_ENTRIES] if voided_http_rules else []
            boilerplate = f"{_HTTP_DENY_PARTLY}{'; '.join(less)}, which is less restrictive."
        else:
            boilerplate = _HTTP_BOILERPLATE_DENY
        warning = (
            f"the L4 agent does not support HTTP attributes (found: {', '.join(sorted(http_fields))}); "
            f"use a waypoint to enforce them. {boilerplate}"
        )
    authorization = pb.Authorization(
        name=policy.meta.name, namespace=namespace, scope=scope, action=action, groups=groups, dry_run=policy.dry_run
    )
    return Converted(authorization, warning)


# --- PeerAuthentication -----------------------------------------------------------------------------------------


def static_strict_policy(root_namespace: str) -> pb.Authorization:
    """Deny any connection without a peer identity; attached to workloads whose effective mode is STRICT."""
    return pb.Authorization(
        name=STATIC_STRICT_NAME,
        namespace=root_namespace,
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.DENY,
        groups=[pb.Group(rules=[pb.Rules(matches=[pb.Match(not_principals=[_presence()])])])],
    )


def _strict(pa: PeerAuthentication | None) -> bool:
    return pa is not None and pa.mode == "STRICT"


def _unset(pa: PeerAuthentication | None) -> bool:
    return pa is None or pa.mode == "UNSET"


def _oldest(current: PeerAuthentication | None, candidate: PeerAuthentication) -> PeerAuthentication:
    if current is None:
        return candidate
    key = (candidate.meta.creation_timestamp, candidate.meta.name)
    return candidate if key < (current.meta.creation_timestamp, current.meta.name) else current


def _has_selector(pa: PeerAuthentication) -> bool:
    """A selector without labels makes a namespace-wide policy, as in istiod's convertedSelectorPeerAuthentications."""
    return bool(pa.selector)


def _mesh_wide_for(pa: PeerAuthentication, namespace: str, root_namespace: str) -> bool:
    """A root namespace policy without labels is mesh wide; one with an empty selector only for workloads of the
    root namespace itself: istiod fetches only selector-less root policies for other namespaces
    (workloads.go fetchPeerAuthentications, policies.go PeerAuthByNamespace)."""
    return pa.meta.namespace == root_namespace and (pa.selector is None or namespace == root_namespace)


def _selects(pa: PeerAuthentication, labels: Mapping[str, str]) -> bool:
    return pa.selector is not None and all(labels.get(k) == v for k, v in pa.selector.items())


def mesh_and_namespace_policies(
    candidates: Iterable[PeerAuthentication], namespace: str, root_namespace: str
) -> tuple[PeerAuthentication | None, PeerAuthentication | None]:
    """The effective (oldest) mesh-wide and namespace-wide PeerAuthentication for `namespace`."""
    mesh = ns_cfg = None
    for pa in candidates:
        if _has_selector(pa):
            continue
        if _mesh_wide_for(pa, namespace, root_namespace):
            mesh = _oldest(mesh, pa)
        elif pa.meta.namespace == namespace:
            ns_cfg = _oldest(ns_cfg, pa)
    return mesh, ns_cfg


def workload_peer_authentication_keys(
    candidates: Iterable[PeerAuthentication], namespace: str, labels: Mapping[str, str], root_namespace: str
) -> list[str]:
    """Policy names ("ns/name") a workload gets from PeerAuthentication, as istiod resolves mesh > namespace > workload.

    `candidates` may contain any PeerAuthentication of the root namespace and of `namespace`; the ones that do
    not apply to this workload are ignored here.
    """
    mesh = ns_cfg = workload = None
    for pa in candidates:
        if not _has_selector(pa):
            if _mesh_wide_for(pa, namespace, root_namespace):
                mesh = _oldest(mesh, pa)
            elif pa.meta.namespace == namespace:
                ns_cfg = _oldest(ns_cfg, pa)
        elif pa.meta.namespace == namespace != root_namespace and pa.selector is not None and _selects(pa, labels):
            workload = _oldest(workload, pa)

    strict = _strict(mesh)
    if ns_cfg is not None and not _unset(ns_cfg):
        strict = _strict(ns_cfg)
    port_key = ""
    if workload is not None:
        if workload.mode == "STRICT":
            strict = True
        elif workload.mode in ("PERMISSIVE", "DISABLE"):
            strict = False
        modes = workload.port_level.values()
        own_key = f"{workload.meta.namespace}/{CONVERTED_PA_PREFIX}{workload.meta.name}"
        if workload.port_level:
            if workload.mode == "STRICT":
                if any(m in ("PERMISSIVE", "DISABLE") for m in modes):
                    port_key, strict = own_key, False
            elif workload.mode in ("PERMISSIVE", "DISABLE"):
                if any(m == "STRICT" for m in modes):
                    port_key = own_key
            elif strict:
                if any(m == "PERMISSIVE" for m in modes):
                    port_key, strict = own_key, False
            elif any(m == "STRICT" for m in modes):
                port_key = own_key
    keys = []
    if strict:
        keys.append(f"{root_namespace}/{STATIC_STRICT_NAME}")
    if port_key:
        keys.append(port_key)
    return sorted(keys)


def convert_peer_authentication(
    pa: PeerAuthentication,
    ns_cfg: PeerAuthentication | None,
    mesh: PeerAuthentication | None,
    root_namespace: str,
) -> pb.Authorization | None:
    """The `converted_peer_authentication_<name>` DENY policy for a workload policy with port-level mTLS."""
    if pa.meta.namespace == root_namespace or not pa.selector or not pa.port_level:
        return None
    mode = pa.mode
    # What the workload inherits when its own mode is UNSET, resolved as workload_peer_authentication_keys does.
    # istiod writes these conditions inline, and two of them disagree with that resolution: `&&` binding tighter
    # than `||` skips a STRICT port of a PERMISSIVE workload under a STRICT mesh, and an UNSET namespace policy
    # hides a STRICT mesh from a PERMISSIVE port. Either way the workload referenced this policy while none was
    # made, so it accepted plaintext on every port (fail open).
    parent_strict = _strict(ns_cfg) if ns_cfg is not None and not _unset(ns_cfg) else _strict(mesh)
    rules: list[pb.Rules] = []
    groups: list[pb.Group] = []
    if mode == "STRICT":
        rules.append(pb.Rules(matches=[pb.Match(not_principals=[_presence()])]))
    found_non_strict = False
    for port in sorted(pa.port_level):
        port_mode = pa.port_level[port]
        if port_mode == "STRICT":
            if mode == "STRICT" or (mode == "UNSET" and parent_strict):
                continue  # already enforced by the workload's or the inherited mode
            # Groups are OR-ed: one per STRICT port.
            matches = [pb.Match(not_principals=[_presence()], destination_ports=[port])]
            groups.append(pb.Group(rules=[pb.Rules(matches=matches)]))
        elif port_mode in ("PERMISSIVE", "DISABLE"):
            if mode in ("PERMISSIVE", "DISABLE") or (mode == "UNSET" and not parent_strict):
                continue  # nothing STRICT to make an exception from
            found_non_strict = True
            # Deny unless the connection goes to this port (AND-ed with "no identity" in the same group).
            rules.append(pb.Rules(matches=[pb.Match(not_destination_ports=[port])]))
    if mode == "STRICT" and not found_non_strict:
        return None
    if not rules and not groups:
        return None
    if parent_strict and found_non_strict:
        rules.append(pb.Rules(matches=[pb.Match(not_principals=[_presence()])]))
    if rules:
        groups.append(pb.Group(rules=rules))
    return pb.Authorization(
        name=f"{CONVERTED_PA_PREFIX}{pa.meta.name}",
        namespace=pa.meta.namespace,
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.DENY,
        groups=groups,
    )


def peer_authentication_warning(pa: PeerAuthentication) -> str:
    if pa.mode == "DISABLE" or "DISABLE" in pa.port_level.values():
        warning = "mode DISABLE is not supported in ambient mode and is treated as PERMISSIVE"
        if pa.mode == "UNSET" and "DISABLE" in pa.port_level.values():
            # istiod's conversion: a port exception to an inherited STRICT keeps the parent's mode (fails closed)
            warning += (
                ", except that a port-level DISABLE with no workload mode stays STRICT under a STRICT namespace or mesh"
            )
        return warning
    return ""
