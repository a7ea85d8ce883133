"""Parse and validate Kubernetes-style config documents into controller/model.py objects.

Validation is strict in the spirit of `kubectl --validate=strict`: every field at a level the controller
understands must be known, typed correctly and in range. Levels it does not interpret (a container's image, a pod's
affinity, ...) are accepted as opaque so real manifests still load. One bad object never stops the others: each
document is parsed on its own and every problem becomes a ConfigError naming the source, object and field.

Error string: `<source>:<kind>/<namespace>/<name>: <field>: <reason>`. Cluster-scoped kinds (Namespace, Node) have an
empty namespace (`demo.yaml:Namespace//demo: ...`). When a document has no usable kind, the kind is `?`; when it
has no usable name, the name is `#<n>` (its 1-based position in the source).
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from controller import model
from controller.model import (
    AuthorizationPolicy,
    Condition,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    KObject,
    Meta,
    Namespace,
    Node,
    OpaqueObject,
    Operation,
    PeerAuthentication,
    Pod,
    Rule,
    Service,
    ServiceEntry,
    ServiceEntryPort,
    ServicePort,
    Source,
    WorkloadEntry,
    WorkloadEntrySpec,
)

T = TypeVar("T")

_ISTIO_NETWORKING = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
_ISTIO_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")
_GATEWAY_API = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")

API_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Node": ("v1",),
    "Pod": ("v1",),
    "Service": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "ServiceEntry": _ISTIO_NETWORKING,
    "WorkloadEntry": _ISTIO_NETWORKING,
    "AuthorizationPolicy": _ISTIO_SECURITY,
    "PeerAuthentication": _ISTIO_SECURITY,
    "RequestAuthentication": _ISTIO_SECURITY,
    "Gateway": _GATEWAY_API,
    "HTTPRoute": _GATEWAY_API,
}
OPAQUE_KINDS = frozenset({"RequestAuthentication", "Gateway", "HTTPRoute"})

AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
L4_WHEN_KEYS = frozenset({"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"})
_WHEN_KEYS = frozenset(
    L4_WHEN_KEYS
    | {
        "remote.ip",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "connection.sni",
        "source.serviceAccount",
        "source.trustDomain",
    }
)
# Keys naming a map entry, `prefix...[name]` (Istio's validateMapKey).
_WHEN_KEY_PREFIXES = ("request.headers[", "request.auth.claims[", "experimental.envoy.filters.")

# \Z, not $: "$" also matches before a trailing newline, which YAML block scalars (`key: |`) leave in values.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
_HOSTNAME = re.compile(
    r"^(\*|(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)\Z"
)

_META_FIELDS = frozenset(
    {
        "name",
        "namespace",
        "labels",
        "annotations",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "ownerReferences",
        "finalizers",
        "managedFields",
        "generateName",
        "selfLink",
    }
)
# Kubernetes fields the controller does not interpret but must accept (checked against the v1 API).
_POD_SPEC_OPAQUE = frozenset(
    {
        "activeDeadlineSeconds",
        "affinity",
        "automountServiceAccountToken",
        "dnsConfig",
        "dnsPolicy",
        "enableServiceLinks",
        "ephemeralContainers",
        "hostAliases",
        "hostIPC",
        "hostPID",
        "hostUsers",
        "hostname",
        "imagePullSecrets",
        "initContainers",
        "nodeSelector",
        "os",
        "overhead",
        "preemptionPolicy",
        "priority",
        "priorityClassName",
        "readinessGates",
        "resourceClaims",
        "resources",
        "restartPolicy",
        "runtimeClassName",
        "schedulerName",
        "schedulingGates",
        "securityContext",
        "setHostnameAsFQDN",
        "shareProcessNamespace",
        "subdomain",
        "terminationGracePeriodSeconds",
        "tolerations",
        "topologySpreadConstraints",
        "volumes",
    }
)
_CONTAINER_OPAQUE = frozenset(
    {
        "args",
        "command",
        "env",
        "envFrom",
        "image",
        "imagePullPolicy",
        "lifecycle",
        "livenessProbe",
        "readinessProbe",
        "resizePolicy",
        "resources",
        "restartPolicy",
        "securityContext",
        "startupProbe",
        "stdin",
        "stdinOnce",
        "terminationMessagePath",
        "terminationMessagePolicy",
        "tty",
        "volumeDevices",
        "volumeMounts",
        "workingDir",
    }
)
_POD_STATUS_OPAQUE = frozenset(
    {
        "containerStatuses",
        "ephemeralContainerStatuses",
        "hostIP",
        "hostIPs",
        "initContainerStatuses",
        "message",
        "nominatedNodeName",
        "qosClass",
        "reason",
        "resize",
        "resourceClaimStatuses",
        "startTime",
        "observedGeneration",
    }
)
_SERVICE_SPEC_OPAQUE = frozenset(
    {
        "allocateLoadBalancerNodePorts",
        "externalIPs",
        "externalTrafficPolicy",
        "healthCheckNodePort",
        "ipFamilyPolicy",
        "loadBalancerClass",
        "loadBalancerIP",
        "loadBalancerSourceRanges",
        "sessionAffinity",
        "sessionAffinityConfig",
    }
)
_NODE_SPEC_OPAQUE = frozenset({"configSource", "externalID", "providerID", "taints", "unschedulable"})
_NODE_STATUS_OPAQUE = frozenset(
    {
        "allocatable",
        "capacity",
        "conditions",
        "config",
        "daemonEndpoints",
        "features",
        "images",
        "nodeInfo",
        "phase",
        "runtimeHandlers",
        "volumesAttached",
        "volumesInUse",
        "declaredFeatures",
    }
)
_NODE_SPEC_FIELDS = frozenset({"podCIDR", "podCIDRs"}) | _NODE_SPEC_OPAQUE
_NODE_STATUS_FIELDS = frozenset({"addresses"}) | _NODE_STATUS_OPAQUE
_POD_SPEC_FIELDS = (
    frozenset({"nodeName", "serviceAccountName", "serviceAccount", "hostNetwork", "containers"}) | _POD_SPEC_OPAQUE
)
_CONTAINER_FIELDS = frozenset({"name", "ports"}) | _CONTAINER_OPAQUE
_CONTAINER_PORT_FIELDS = frozenset({"containerPort", "name", "protocol", "hostPort", "hostIP"})
_POD_STATUS_FIELDS = frozenset({"podIP", "podIPs", "phase", "conditions"}) | _POD_STATUS_OPAQUE
_SERVICE_SPEC_FIELDS = (
    frozenset(
        {
            "selector",
            "ports",
            "clusterIP",
            "clusterIPs",
            "type",
            "externalName",
            "internalTrafficPolicy",
            "trafficDistribution",
            "publishNotReadyAddresses",
            "ipFamilies",
        }
    )
    | _SERVICE_SPEC_OPAQUE
)
_SERVICE_PORT_FIELDS = frozenset({"name", "port", "targetPort", "protocol", "appProtocol", "nodePort"})
_TOP_LEVEL_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
# Kinds whose fields sit beside metadata rather than under spec.
_KIND_TOP_LEVEL_FIELDS: Mapping[str, frozenset[str]] = {
    "EndpointSlice": frozenset({"apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"}),
}
_ENDPOINT_FIELDS = frozenset(
    {"addresses", "conditions", "hostname", "targetRef", "nodeName", "zone", "hints", "deprecatedTopology"}
)
_TARGET_REF_FIELDS = frozenset({"kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"})
# The API server's limits (discovery/v1 validation): more would never reach a real controller.
MAX_SLICE_ENDPOINTS = 1000
MAX_SLICE_PORTS = 100
MAX_ENDPOINT_ADDRESSES = 100
_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_OPERATION_STRING_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}


@dataclass(eq=True)
class ConfigError(Exception):
    """One rejected field of one object. `str()` is the stable, user-facing form."""

    source: str
    kind: str
    namespace: str
    name: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.kind}/{self.namespace}/{self.name}: {self.field}: {self.reason}"

    def __hash__(self) -> int:
        return hash(str(self))


@dataclass
class ParseResult:
    objects: list[KObject] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)
    positions: dict[model.ObjectKey, int] = field(default_factory=dict)  # 1-based document index of each object
    # parse_yaml_text only: each object's document as written, what the file source saves as its last good version.
    texts: dict[model.ObjectKey, str] = field(default_factory=dict)
    # The errors of each document that has any, by 1-based index, and (parse_yaml_text only) its text: what tells
    # the file source which object a rejected document was, when its errors cannot name it.
    rejected: dict[int, list[ConfigError]] = field(default_factory=dict)
    rejected_texts: dict[int, str] = field(default_factory=dict)


class _Invalid(Exception):
    """Aborts parsing of the current object after its errors were recorded."""


class _Ctx:
    """Error collection for one object; its identity fills in as the metadata is read."""

    def __init__(self, source: str, index: int, strict: bool) -> None:
        self.source = source
        self.index = index
        self.strict = strict
        self.kind = "?"
        self.namespace = ""
        self.name = f"#{index}"
        self.errors: list[ConfigError] = []
        self.unsupported: list[str] = []  # see _unsupported; collected per AuthorizationPolicy rule

    def error(self, path: str, reason: str) -> None:
        self.errors.append(ConfigError(self.source, self.kind, self.namespace, self.name, path, reason))


def parse_yaml_text(source: str, text: str, cache: dict[str, Any] | None = None) -> ParseResult:
    """Parse a multi-document YAML text; a syntax error costs only the document it is in.

    ``cache`` (document text -> loaded value; one per file, owned by the caller) skips loading documents that did
    not change since the last call: YAML loading dominates re-reading a large file after a one-line edit. The
    cache is left holding exactly this text's documents. Loaded values are shared, never mutated.
    """
    docs: list[Any] = []
    pre_errors: dict[int, ConfigError] = {}
    loaded: dict[str, Any] = {}
    chunks = _split_documents(text)
    for index, (first_line, chunk) in enumerate(chunks, start=1):
        if cache is not None and chunk in cache:
            docs.append(cache[chunk])
            loaded[chunk] = cache[chunk]
            continue
        try:
            doc = yaml.load(chunk, Loader=_LOADER)
            if "&" in chunk and "*" in chunk and _expanded_size(doc, MAX_EXPANDED_VALUES) > MAX_EXPANDED_VALUES:
                pre_errors[index] = ConfigError(source, "?", "", f"#{index}", "document", _ALIAS_PROBLEM)
                docs.append(_SKIP)
                continue
            docs.append(doc)
            loaded[chunk] = doc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {first_line + mark.line + 1}" if mark is not None else "document"
            problem = getattr(exc, "problem", None) or str(exc)
            pre_errors[index] = ConfigError(source, "?", "", f"#{index}", where, f"invalid YAML: {problem}")
            docs.append(_SKIP)
    if cache is not None:
        cache.clear()
        cache.update(loaded)
    result = parse_documents(source, docs)
    result.errors[:0] = pre_errors.values()
    result.rejected.update((index, [err]) for index, err in pre_errors.items())
    result.texts = {key: chunks[index - 1][1] for key, index in result.positions.items()}
    result.rejected_texts = {index: chunks[index - 1][1] for index in result.rejected}
    return result


_SKIP = object()
MAX_EXPANDED_VALUES = 100_000
_ALIAS_PROBLEM = f"invalid YAML: its aliases expand to more than {MAX_EXPANDED_VALUES} values"


def _expanded_size(doc: Any, limit: int) -> int:
    """How many values `doc` holds once its YAML aliases are expanded, counted up to just past `limit`. Aliases load
    as shared references, so a few lines (each level naming the one below ten times) stand for billions of values:
    nothing is allocated, but every comparison, walk or dump of the document then takes exponential time (the
    kube-apiserver refuses such documents as "excessive aliasing"). Linear in the distinct values: each one's
    expanded size is worked out once."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        known = sizes.get(id(node))
        if known is not None:
            return known
        total = 1
        for child in node.values() if isinstance(node, dict) else node:
            total += size(child)
            if total > limit:
                break
        sizes[id(node)] = total
        return total

    try:
        return size(doc)
    except RecursionError:  # nested past Python's stack: no document of ours is, and walking it would fail later
        return limit + 1


# libyaml's loader is ~10x faster; same safe subset of YAML.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DOC_SEPARATOR = re.compile(r"^---(\s|$)")


def _split_documents(text: str) -> list[tuple[int, str]]:
    """Split at `---` lines so each document parses on its own; returns (0-based first line, text) pairs."""
    chunks: list[tuple[int, str]] = []
    start, current = 0, list[str]()
    for lineno, line in enumerate(text.splitlines(keepends=True)):
        if _DOC_SEPARATOR.match(line):
            chunks.append((start, "".join(current)))
            # Anything after `---` on the same line is document content (e.g. `--- !tag` or `--- {a: 1}`).
            start, current = lineno, [line[3:]]
        else:
            current.append(line)
    chunks.append((start, "".join(current)))
    return [(s, c) for s, c in chunks if c.strip() and not _only_comments(c)]


def _only_comments(chunk: str) -> bool:
    return all(
        not line.strip() or line.lstrip().startswith("#") or line.strip() == "..." for line in chunk.splitlines()
    )


def parse_documents(source: str, docs: Iterable[Any], *, strict: bool = True) -> ParseResult:
    """Validate already-decoded documents (dicts from YAML or JSON, camelCase as the API serves them).

    None documents are skipped. `strict=False` accepts unknown fields (for objects the API server already validated,
    which may carry fields newer than this code); everything else is checked the same way.
    """
    result = ParseResult()
    seen: dict[model.ObjectKey, int] = {}
    index = 0
    for doc in docs:
        index += 1
        if doc is None or doc is _SKIP:
            continue
        first_error = len(result.errors)
        items = [doc]
        if isinstance(doc, dict) and doc.get("kind") == "List" and doc.get("apiVersion") == "v1":
            raw_items = doc.get("items")
            items = raw_items if isinstance(raw_items, list) else []
            if not isinstance(raw_items, list):
                result.errors.append(ConfigError(source, "List", "", f"#{index}", "items", "must be a list"))
        for item in items:
            ctx = _Ctx(source, index, strict)
            obj = _parse_object(ctx, item)
            result.errors.extend(ctx.errors)
            if obj is None:
                continue
            if obj.key in seen:
                result.errors.append(
                    ConfigError(
                        source,
                        obj.key.kind,
                        obj.key.namespace,
                        obj.key.name,
                        "metadata.name",
                        f"duplicate object (first defined in document #{seen[obj.key]})",
                    )
                )
                continue
            seen[obj.key] = index
            result.objects.append(obj)
            result.positions[obj.key] = index
        if len(result.errors) > first_error:
            result.rejected[index] = result.errors[first_error:]
    return result


def _parse_object(ctx: _Ctx, doc: Any) -> KObject | None:
    if not isinstance(doc, dict):
        ctx.error("(document)", f"must be a mapping with apiVersion, kind and metadata, got {_type_name(doc)}")
        return None
    kind = doc.get("kind")
    api_version = doc.get("apiVersion")
    raw_meta = doc.get("metadata")
    # Fill in the identity first so every later error names the object.
    if isinstance(kind, str) and kind:
        ctx.kind = kind
    if isinstance(raw_meta, dict):
        if isinstance(raw_meta.get("name"), str) and raw_meta["name"]:
            ctx.name = raw_meta["name"]
        if not (isinstance(kind, str) and kind in model.CLUSTER_SCOPED_KINDS):
            ns = raw_meta.get("namespace")
            ctx.namespace = ns if isinstance(ns, str) and ns else "default"
    if not isinstance(kind, str) or not kind:
        ctx.error("kind", "required field is missing" if not kind else f"must be a string, got {_type_name(kind)}")
        return None
    if kind not in API_VERSIONS:
        # A typo'd kind names no object this code knows: say which document, and what was probably meant.
        close = difflib.get_close_matches(kind, list(API_VERSIONS), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(API_VERSIONS))}"
        ctx.error("kind", f"unknown kind {kind!r} in document #{ctx.index} ({hint})")
        return None
    if not isinstance(api_version, str) or not api_version:
        reason = f"must be a string, got {_type_name(api_version)}" if api_version else "required field is missing"
        ctx.error("apiVersion", reason)
        return None
    if api_version not in API_VERSIONS[kind]:
        ctx.error("apiVersion", f"{api_version!r} does not serve kind {kind} (use {' or '.join(API_VERSIONS[kind])})")
        return None
    _check_unknown(ctx, doc, "", _KIND_TOP_LEVEL_FIELDS.get(kind, _TOP_LEVEL_FIELDS))
    try:
        meta = _parse_meta(ctx, raw_meta)
        builder = _BUILDERS.get(kind)
        if builder is None:
            # Not interpreted, but a spec that is not a mapping is refused (dict() of a list or string would raise).
            spec = _mapping(ctx, doc, "spec", "", None)
            obj: KObject | None = OpaqueObject(kind, api_version, meta, MappingProxyType(dict(spec)))
        else:
            obj = builder(ctx, meta, doc)
    except _Invalid:
        return None
    return None if ctx.errors else obj


# --- field helpers ----------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check_unknown(ctx: _Ctx, data: dict[Any, Any], path: str, allowed: Iterable[str]) -> None:
    if not ctx.strict:
        return
    allowed_set = allowed if isinstance(allowed, frozenset | set) else frozenset(allowed)
    if data.keys() <= allowed_set:
        return
    for key in data:
        if key not in allowed_set:
            ctx.error(_join(path, str(key)), "unknown field")


def _mapping(
    ctx: _Ctx, parent: dict[Any, Any], key: str, path: str, allowed: Iterable[str] | None, required: bool = False
) -> dict[Any, Any]:
    """A sub-mapping; `allowed=None` accepts any keys. Missing -> {} (or an error when required)."""
    value = parent.get(key)
    if value is None:
        if required:
            ctx.error(_join(path, key), "required field is missing")
        return {}
    if not isinstance(value, dict):
        ctx.error(_join(path, key), f"must be a mapping, got {_type_name(value)}")
        return {}
    if allowed is not None:
        _check_unknown(ctx, value, _join(path, key), allowed)
    return value


def _list(ctx: _Ctx, parent: dict[Any, Any], key: str, path: str, required: bool = False) -> list[Any]:
    value = parent.get(key)
    if value is None:
        if required:
            ctx.error(_join(path, key), "required field is missing")
        return []
    if not isinstance(value, list):
        ctx.error(_join(path, key), f"must be a list, got {_type_name(value)}")
        return []
    if required and not value:
        ctx.error(_join(path, key), "must not be empty")
    return value


def _str(ctx: _Ctx, parent: dict[Any, Any], key: str, path: str, required: bool = False, default: str = "") -> str:
    value = parent.get(key)
    if type(value) is str and (value or not required):
        return value
    if value is None:
        if required:
            ctx.error(_join(path, key), "required field is missing")
        return default
    if not isinstance(value, str):
        ctx.error(_join(path, key), f"must be a string, got {_type_name(value)}")
        return default
    ctx.error(_join(path, key), "must not be empty")
    return value


def _bool(ctx: _Ctx, parent: dict[Any, Any], key: str, path: str) -> bool:
    value = parent.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        ctx.error(_join(path, key), f"must be a boolean, got {_type_name(value)}")
        return False
    return value


def _int(ctx: _Ctx, value: Any, path: str, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.error(path, f"must be an integer, got {_type_name(value)}")
        return None
    if not low <= value <= high:
        ctx.error(path, f"{value} is out of range ({low}-{high})")
        return None
    return value


def _port(ctx: _Ctx, value: Any, path: str) -> int | None:
    return _int(ctx, value, path, 1, 65535)


def _enum(ctx: _Ctx, parent: dict[Any, Any], key: str, path: str, values: tuple[str, ...], default: str) -> str:
    value = _str(ctx, parent, key, path, default=default)
    if value not in values:
        ctx.error(_join(path, key), f"unknown value {value!r} (valid: {', '.join(values)})")
        return default
    return value


def _strings(
    ctx: _Ctx, parent: dict[Any, Any], key: str, path: str, check: Callable[[str], str | None] | None
) -> tuple[str, ...]:
    """A list of non-empty strings, each optionally checked (`check` returns a reason or None)."""
    out: list[str] = []
    for i, item in enumerate(_list(ctx, parent, key, path)):
        full = f"{_join(path, key)}[{i}]"
        if not isinstance(item, str):
            ctx.error(full, f"must be a string, got {_type_name(item)}")
        elif not item:
            ctx.error(full, "must not be empty")
        elif check is not None and (reason := check(item)) is not None:
            ctx.error(full, reason)
        else:
            out.append(item)
    return tuple(out)


def _each(ctx: _Ctx, items: list[Any], path: str, parse: Callable[[dict[Any, Any], str], T | None]) -> tuple[T, ...]:
    out: list[T] = []
    for i, item in enumerate(items):
        full = f"{path}[{i}]"
        if not isinstance(item, dict):
            ctx.error(full, f"must be a mapping, got {_type_name(item)}")
            continue
        parsed = parse(item, full)
        if parsed is not None:
            out.append(parsed)
    return tuple(out)


# --- value checks (return a reason, or None when fine) ----------------------------------------------------------


def check_ip(value: str) -> str | None:
    # inet_pton: same acceptance as ipaddress for canonical text, and much faster (runs for every pod).
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    except (OSError, ValueError):  # ValueError: an embedded NUL, which YAML's "\0" escape can produce
        return f"{value!r} is not a valid IP address"
    return None


def check_ip_or_cidr(value: str) -> str | None:
    if "%" in value:
        # ipaddress takes an IPv6 zone (fe80::1%eth0); inet_pton, Go's net.ParseIP and the translator do not.
        return f"{value!r}: an IPv6 zone (%...) has no meaning in the mesh"
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not a valid IP address or CIDR"
    return None


def check_cidr(value: str) -> str | None:
    if "/" not in value:
        return f"{value!r} is not a CIDR (address/prefix-length)"
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        return f"{value!r} is not a valid CIDR: {exc}"
    return None


def _check_wildcard(value: str) -> str | None:
    if any(c.isspace() for c in value):
        return f"{value!r} contains whitespace"
    if value != "*" and "*" in value.strip("*"):
        return f"{value!r}: '*' is only supported alone, as a prefix or as a suffix"
    if value.startswith("*") and value.endswith("*") and value != "*":
        return f"{value!r}: '*' is only supported alone, as a prefix or as a suffix"
    return None


def check_principal(value: str) -> str | None:
    if value.startswith("spiffe://"):
        return f"{value!r}: write principals without the spiffe:// scheme (<trust-domain>/ns/<namespace>/sa/<account>)"
    return _check_wildcard(value)


def check_namespace_match(value: str) -> str | None:
    reason = _check_wildcard(value)
    if reason is None and "*" not in value and not _DNS_LABEL.match(value):
        return f"{value!r} is not a valid namespace name"
    return reason


def check_service_account_match(value: str) -> str | None:
    parts = value.split("/")
    if len(parts) > 2:
        return f"{value!r} must be <account> or <namespace>/<account>"
    if "*" in value:
        return f"{value!r}: wildcards are not supported for service accounts"
    if len(parts) == 2 and not _DNS_LABEL.match(parts[0]):
        return f"{value!r}: {parts[0]!r} is not a valid namespace name"
    if not _DNS_SUBDOMAIN.match(parts[-1]):
        return f"{value!r}: {parts[-1]!r} is not a valid service account name"
    return None


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' (int() refuses it) and '٣' (int() reads 3)."""
    return text.isascii() and text.isdigit()


def check_port_string(value: str) -> str | None:
    if not is_decimal(value) or not 1 <= int(value) <= 65535:
        return f"{value!r} is not a port number (1-65535)"
    return None


def _check_label_key(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return f"label key {key!r}: name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _check_label_value(value: str) -> str | None:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return f"label value {value!r}: at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _labels(ctx: _Ctx, value: Any, path: str, check_values: bool = True) -> dict[str, str]:
    """A string->string map of label keys (annotations pass check_values=False)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        ctx.error(path, f"must be a mapping, got {_type_name(value)}")
        return {}
    out: dict[str, str] = {}
    for key, val in value.items():
        full = f"{path}[{key}]"
        if not isinstance(key, str):
            ctx.error(full, f"key must be a string, got {_type_name(key)}")
            continue
        if (reason := _check_label_key(key)) is not None:
            ctx.error(full, reason)
            continue
        if not isinstance(val, str):
            ctx.error(full, f"value must be a string (quote it), got {_type_name(val)}")
            continue
        if check_values and (reason := _check_label_value(val)) is not None:
            ctx.error(full, reason)
            continue
        out[key] = val
    return out


def _selector(ctx: _Ctx, parent: dict[Any, Any], key: str, path: str, inner: str) -> dict[str, str] | None:
    """Istio's `{matchLabels: {...}}` (inner="matchLabels") or ServiceEntry's `{labels: {...}}`."""
    if parent.get(key) is None:
        return None
    sel = _mapping(ctx, parent, key, path, (inner,))
    return _labels(ctx, sel.get(inner), f"{_join(path, key)}.{inner}")


def _timestamp(ctx: _Ctx, value: Any, path: str) -> str:
    """Normalise to RFC 3339 UTC text (sortable); YAML may already have turned it into a datetime."""
    if value is None:
        return ""
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            ctx.error(path, f"{value!r} is not an RFC 3339 timestamp")
            return ""
    else:
        ctx.error(path, f"must be a timestamp, got {_type_name(value)}")
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- metadata ---------------------------------------------------------------------------------------------------


def _parse_meta(ctx: _Ctx, raw: Any) -> Meta:
    if raw is None:
        ctx.error("metadata", "required field is missing")
        raise _Invalid
    if not isinstance(raw, dict):
        ctx.error("metadata", f"must be a mapping, got {_type_name(raw)}")
        raise _Invalid
    _check_unknown(ctx, raw, "metadata", _META_FIELDS)
    name = _str(ctx, raw, "name", "metadata", required=True)
    if name:
        label_name = ctx.kind in ("Namespace", "Service")
        pattern, limit = (
            (_DNS1035_LABEL if ctx.kind == "Service" else _DNS_LABEL, 63) if label_name else (_DNS_SUBDOMAIN, 253)
        )
        if len(name) > limit or not pattern.match(name):
            what = (
                "an RFC 1035 label" if ctx.kind == "Service" else ("a DNS label" if label_name else "a DNS subdomain")
            )
            ctx.error("metadata.name", f"{name!r} is not {what} (lowercase alphanumerics and '-', max {limit})")
    namespace = ""
    if ctx.kind not in model.CLUSTER_SCOPED_KINDS:
        namespace = _str(ctx, raw, "namespace", "metadata", default="default") or "default"
        if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
            ctx.error("metadata.namespace", f"{namespace!r} is not a valid namespace name")
    labels = _labels(ctx, raw.get("labels"), "metadata.labels")
    annotations = _labels(ctx, raw.get("annotations"), "metadata.annotations", check_values=False)
    uid = raw.get("uid")
    if uid is not None and not isinstance(uid, str):
        ctx.error("metadata.uid", f"must be a string, got {_type_name(uid)}")
        uid = None
    owner_kind = owner_name = ""
    owners = _list(ctx, raw, "ownerReferences", "metadata")
    for i, owner in enumerate(owners):
        if (
            not isinstance(owner, dict)
            or not isinstance(owner.get("kind"), str)
            or not isinstance(owner.get("name"), str)
        ):
            ctx.error(f"metadata.ownerReferences[{i}]", "must be a mapping with string kind and name")
            continue
        if owner.get("controller") is True and not owner_kind:
            owner_kind, owner_name = owner["kind"], owner["name"]
    if not _str(ctx, raw, "generateName", "metadata"):
        # istiod names a pod's workload after its controller only when the pod's name was generated
        # (GetDeployMetaFromPod): a pod named explicitly, by hand or by an operator, is its own workload.
        owner_kind = owner_name = ""
    return Meta(
        name=name,
        namespace=namespace,
        labels=MappingProxyType(labels),
        annotations=MappingProxyType(annotations),
        uid=uid or "",
        creation_timestamp=_timestamp(ctx, raw.get("creationTimestamp"), "metadata.creationTimestamp"),
        deleting=raw.get("deletionTimestamp") is not None,
        owner_kind=owner_kind,
        owner_name=owner_name,
    )


# --- core kinds ------------------------------------------------------------------------------------------------


def _build_namespace(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> Namespace:
    _mapping(ctx, doc, "spec", "", ("finalizers",))
    _mapping(ctx, doc, "status", "", None)
    return Namespace(meta)


def _build_node(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> Node:
    spec = _mapping(ctx, doc, "spec", "", _NODE_SPEC_FIELDS)
    cidrs = list(_strings(ctx, spec, "podCIDRs", "spec", check_cidr))
    pod_cidr = _str(ctx, spec, "podCIDR", "spec")
    if pod_cidr:
        if (reason := check_cidr(pod_cidr)) is not None:
            ctx.error("spec.podCIDR", reason)
        elif pod_cidr not in cidrs:
            cidrs.insert(0, pod_cidr)
    status = _mapping(ctx, doc, "status", "", _NODE_STATUS_FIELDS)

    def address(item: dict[Any, Any], path: str) -> tuple[str, str] | None:
        _check_unknown(ctx, item, path, ("type", "address"))
        kind = _str(ctx, item, "type", path, required=True)
        addr = _str(ctx, item, "address", path, required=True)
        if kind in ("InternalIP", "ExternalIP") and addr and (reason := check_ip(addr)) is not None:
            ctx.error(f"{path}.address", reason)
            return None
        return (kind, addr)

    addresses = _each(ctx, _list(ctx, status, "addresses", "status"), "status.addresses", address)
    internal = tuple(addr for kind, addr in addresses if kind == "InternalIP")
    return Node(meta, pod_cidrs=tuple(cidrs), internal_ips=internal)


def _container_port(ctx: _Ctx, item: dict[Any, Any], path: str) -> ContainerPort | None:
    _check_unknown(ctx, item, path, _CONTAINER_PORT_FIELDS)
    if "containerPort" not in item:
        ctx.error(f"{path}.containerPort", "required field is missing")
        return None
    port = _port(ctx, item["containerPort"], f"{path}.containerPort")
    name = _str(ctx, item, "name", path)
    if name and (reason := _check_port_name(name)) is not None:
        ctx.error(f"{path}.name", reason)
    protocol = _enum(ctx, item, "protocol", path, ("TCP", "UDP", "SCTP"), "TCP")
    if item.get("hostPort") is not None:
        _port(ctx, item["hostPort"], f"{path}.hostPort")
    return None if port is None else ContainerPort(port=port, name=name, protocol=protocol)


def _check_port_name(name: str) -> str | None:
    if len(name) > 15 or not _IANA_SVC_NAME.match(name) or "--" in name or not any(c.isalpha() for c in name):
        return f"{name!r} is not a valid port name (1-15 lowercase alphanumerics or '-', with a letter, no '--')"
    return None


def _build_pod(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> Pod:
    spec = _mapping(ctx, doc, "spec", "", _POD_SPEC_FIELDS)
    node_name = _str(ctx, spec, "nodeName", "spec")
    service_account = _str(ctx, spec, "serviceAccountName", "spec") or _str(ctx, spec, "serviceAccount", "spec")
    if service_account and not _DNS_SUBDOMAIN.match(service_account):
        ctx.error("spec.serviceAccountName", f"{service_account!r} is not a valid service account name")
    host_network = _bool(ctx, spec, "hostNetwork", "spec")
    ports: list[ContainerPort] = []
    for i, container in enumerate(_list(ctx, spec, "containers", "spec")):
        path = f"spec.containers[{i}]"
        if not isinstance(container, dict):
            ctx.error(path, f"must be a mapping, got {_type_name(container)}")
            continue
        _check_unknown(ctx, container, path, _CONTAINER_FIELDS)
        _str(ctx, container, "name", path, required=True)
        port_path = f"{path}.ports"
        ports += _each(ctx, _list(ctx, container, "ports", path), port_path, lambda d, p: _container_port(ctx, d, p))

    status = _mapping(ctx, doc, "status", "", _POD_STATUS_FIELDS)
    ips: list[str] = []
    for i, entry in enumerate(_list(ctx, status, "podIPs", "status")):
        path = f"status.podIPs[{i}]"
        if not isinstance(entry, dict):
            ctx.error(path, f"must be a mapping, got {_type_name(entry)}")
            continue
        _check_unknown(ctx, entry, path, ("ip",))
        ip = _str(ctx, entry, "ip", path, required=True)
        if ip and (reason := check_ip(ip)) is not None:
            ctx.error(f"{path}.ip", reason)
        elif ip:
            ips.append(ip)
    pod_ip = _str(ctx, status, "podIP", "status")
    if pod_ip:
        if (reason := check_ip(pod_ip)) is not None:
            ctx.error("status.podIP", reason)
        elif ips and ips[0] != pod_ip:
            ctx.error("status.podIP", f"{pod_ip!r} differs from status.podIPs[0] {ips[0]!r}")
        elif not ips:
            ips.append(pod_ip)
    phase = _enum(ctx, status, "phase", "status", ("", "Pending", "Running", "Succeeded", "Failed", "Unknown"), "")
    ready = ""
    for i, cond in enumerate(_list(ctx, status, "conditions", "status")):
        if not isinstance(cond, dict):
            ctx.error(f"status.conditions[{i}]", f"must be a mapping, got {_type_name(cond)}")
        elif cond.get("type") == "Ready":
            ready = str(cond.get("status", ""))
    return Pod(
        meta,
        node_name=node_name,
        service_account=service_account or "default",
        host_network=host_network,
        ips=tuple(ips),
        phase=phase,
        ready=ready,
        container_ports=tuple(ports),
    )


def _service_port(ctx: _Ctx, item: dict[Any, Any], path: str) -> ServicePort | None:
    _check_unknown(ctx, item, path, _SERVICE_PORT_FIELDS)
    if "port" not in item:
        ctx.error(f"{path}.port", "required field is missing")
        return None
    port = _port(ctx, item["port"], f"{path}.port")
    name = _str(ctx, item, "name", path)
    if name and (len(name) > 63 or not _DNS_LABEL.match(name)):
        ctx.error(f"{path}.name", f"{name!r} is not a DNS label")
    protocol = _enum(ctx, item, "protocol", path, ("TCP", "UDP", "SCTP"), "TCP")
    raw_target = item.get("targetPort")
    target: int | str | None = None
    if isinstance(raw_target, str) and is_decimal(raw_target):
        raw_target = int(raw_target)
    if isinstance(raw_target, str):
        if (reason := _check_port_name(raw_target)) is not None:
            ctx.error(f"{path}.targetPort", reason)
        target = raw_target
    elif raw_target is not None:
        target = _port(ctx, raw_target, f"{path}.targetPort")
    if item.get("nodePort") is not None:
        _port(ctx, item["nodePort"], f"{path}.nodePort")
    app_protocol = _str(ctx, item, "appProtocol", path)
    if port is None:
        return None
    return ServicePort(port=port, name=name, protocol=protocol, target_port=target, app_protocol=app_protocol)


def _build_service(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> Service:
    spec = _mapping(ctx, doc, "spec", "", _SERVICE_SPEC_FIELDS, required=True)
    if not spec:
        raise _Invalid
    _mapping(ctx, doc, "status", "", None)
    selector = _labels(ctx, spec.get("selector"), "spec.selector")
    svc_type = _enum(ctx, spec, "type", "spec", ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"), "ClusterIP")
    cluster_ip = _str(ctx, spec, "clusterIP", "spec")
    ips = list(_strings(ctx, spec, "clusterIPs", "spec", lambda v: None if v == "None" else check_ip(v)))
    if "None" in ips and len(ips) > 1:
        # It would reach the translator as an address (and fail there), or hide the real ones.
        ctx.error("spec.clusterIPs", "'None' (headless) must be the only entry")
        ips = [ip for ip in ips if ip != "None"]
    headless = cluster_ip == "None" or ips == ["None"]
    if cluster_ip and not headless:
        if (reason := check_ip(cluster_ip)) is not None:
            ctx.error("spec.clusterIP", reason)
        elif ips and ips[0] != cluster_ip:
            ctx.error("spec.clusterIP", f"{cluster_ip!r} differs from spec.clusterIPs[0] {ips[0]!r}")
        elif not ips:
            ips.append(cluster_ip)
    if headless:
        ips = []
    if svc_type == "ExternalName":
        name = _str(ctx, spec, "externalName", "spec", required=True)
        if name and not _HOSTNAME.match(name):
            ctx.error("spec.externalName", f"{name!r} is not a valid hostname")
    raw_ports = _list(ctx, spec, "ports", "spec", required=not headless and svc_type != "ExternalName")
    ports = _each(ctx, raw_ports, "spec.ports", lambda d, p: _service_port(ctx, d, p))
    if len(raw_ports) > 1:
        for i, port in enumerate(ports):
            if not port.name:
                ctx.error(f"spec.ports[{i}].name", "required when the service has more than one port")
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        if port.name and port.name in seen_names:
            ctx.error(f"spec.ports[{i}].name", f"duplicate port name {port.name!r}")
        if (port.port, port.protocol) in seen_ports:
            ctx.error(f"spec.ports[{i}].port", f"duplicate port {port.port}/{port.protocol}")
        seen_names.add(port.name)
        seen_ports.add((port.port, port.protocol))
    families = tuple(
        _strings(
            ctx, spec, "ipFamilies", "spec", lambda v: None if v in ("IPv4", "IPv6") else f"{v!r} is not IPv4 or IPv6"
        )
    )
    return Service(
        meta,
        selector=MappingProxyType(selector) if selector else None,
        ports=ports,
        cluster_ips=tuple(ips),
        headless=headless,
        type=svc_type,
        internal_traffic_policy=_enum(ctx, spec, "internalTrafficPolicy", "spec", ("Cluster", "Local"), "Cluster"),
        traffic_distribution=_str(ctx, spec, "trafficDistribution", "spec"),
        publish_not_ready_addresses=_bool(ctx, spec, "publishNotReadyAddresses", "spec"),
        ip_families=families,
    )


def _endpoint_address_check(address_type: str) -> Callable[[str], str | None]:
    """An endpoint address must be of the slice's addressType (kube-proxy and istiod trust it to be)."""

    def check(value: str) -> str | None:
        if address_type == "FQDN":
            ok = len(value) <= 253 and _DNS_SUBDOMAIN.match(value) is not None
            return None if ok else f"{value!r} is not a DNS subdomain (addressType FQDN)"
        reason = check_ip(value)
        if reason is None and (":" in value) != (address_type == "IPv6"):
            reason = f"{value!r} is not an {address_type} address (addressType {address_type})"
        return reason

    return check


def _endpoint(ctx: _Ctx, item: dict[Any, Any], path: str, address_type: str) -> Endpoint | None:
    _check_unknown(ctx, item, path, _ENDPOINT_FIELDS)
    raw = _list(ctx, item, "addresses", path, required=True)
    if len(raw) > MAX_ENDPOINT_ADDRESSES:
        ctx.error(f"{path}.addresses", f"{len(raw)} addresses, more than {MAX_ENDPOINT_ADDRESSES}")
    addresses = _strings(ctx, item, "addresses", path, _endpoint_address_check(address_type))
    conditions = _mapping(ctx, item, "conditions", path, ("ready", "serving", "terminating"))
    flags = [
        None if conditions.get(name) is None else _bool(ctx, conditions, name, f"{path}.conditions")
        for name in ("ready", "serving", "terminating")
    ]
    ref = _mapping(ctx, item, "targetRef", path, _TARGET_REF_FIELDS)
    ref_path = f"{path}.targetRef"
    target = [_str(ctx, ref, name, ref_path) for name in ("kind", "namespace", "name", "uid")]
    for name in ("apiVersion", "resourceVersion", "fieldPath"):
        _str(ctx, ref, name, ref_path)
    node_name = _str(ctx, item, "nodeName", path)
    if node_name and (len(node_name) > 253 or not _DNS_SUBDOMAIN.match(node_name)):
        ctx.error(f"{path}.nodeName", f"{node_name!r} is not a valid node name")
    hostname = _str(ctx, item, "hostname", path)
    if hostname and (len(hostname) > 63 or not _DNS_LABEL.match(hostname)):
        ctx.error(f"{path}.hostname", f"{hostname!r} is not a DNS label")
    _mapping(ctx, item, "hints", path, None)
    _mapping(ctx, item, "deprecatedTopology", path, None)
    if len(addresses) != len(raw):
        return None
    return Endpoint(
        addresses=addresses,
        ready=flags[0],
        serving=flags[1],
        terminating=flags[2],
        target_kind=target[0],
        target_namespace=target[1],
        target_name=target[2],
        target_uid=target[3],
        node_name=node_name,
        zone=_str(ctx, item, "zone", path),
        hostname=hostname,
    )


def _endpoint_port(ctx: _Ctx, item: dict[Any, Any], path: str) -> EndpointPort | None:
    _check_unknown(ctx, item, path, ("name", "port", "protocol", "appProtocol"))
    # The API server's defaults: an unnamed port is the Service's unnamed one, TCP unless said otherwise.
    name = _str(ctx, item, "name", path)
    if name and (len(name) > 63 or not _DNS_LABEL.match(name)):
        ctx.error(f"{path}.name", f"{name!r} is not a DNS label (it names a port of the Service)")
    port = None if item.get("port") is None else _port(ctx, item["port"], f"{path}.port")
    protocol = _enum(ctx, item, "protocol", path, ("TCP", "UDP", "SCTP"), "TCP")
    return EndpointPort(name=name, port=port, protocol=protocol, app_protocol=_str(ctx, item, "appProtocol", path))


def _build_endpoint_slice(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> EndpointSlice:
    if doc.get("addressType") is None:
        ctx.error("addressType", "required field is missing")
        raise _Invalid
    address_type = _enum(ctx, doc, "addressType", "", ("IPv4", "IPv6", "FQDN"), "")
    if not address_type:
        raise _Invalid  # every address would be judged against the wrong family
    raw_endpoints = _list(ctx, doc, "endpoints", "")
    if len(raw_endpoints) > MAX_SLICE_ENDPOINTS:
        ctx.error("endpoints", f"{len(raw_endpoints)} endpoints, more than {MAX_SLICE_ENDPOINTS}")
    endpoints = _each(ctx, raw_endpoints, "endpoints", lambda d, p: _endpoint(ctx, d, p, address_type))
    raw_ports = _list(ctx, doc, "ports", "")
    if len(raw_ports) > MAX_SLICE_PORTS:
        ctx.error("ports", f"{len(raw_ports)} ports, more than {MAX_SLICE_PORTS}")
    ports = _each(ctx, raw_ports, "ports", lambda d, p: _endpoint_port(ctx, d, p))
    seen: set[str] = set()
    for i, port in enumerate(ports):
        if port.name in seen:
            # Which of the two would the Service's port of that name be served on?
            ctx.error(f"ports[{i}].name", f"duplicate port name {port.name!r}")
        seen.add(port.name)
    service = meta.labels.get(model.SERVICE_NAME_LABEL)
    # A typo in a file; from the API server, a slice some other controller labels for no Service is just unused.
    if ctx.strict and service is not None and (len(service) > 63 or not _DNS1035_LABEL.match(service)):
        ctx.error(f"metadata.labels[{model.SERVICE_NAME_LABEL}]", f"{service!r} cannot name a Service")
    return EndpointSlice(meta, address_type=address_type, endpoints=endpoints, ports=ports)


# --- Istio networking -------------------------------------------------------------------------------------------


def _workload_entry_spec(ctx: _Ctx, item: dict[Any, Any], path: str, static: bool = False) -> WorkloadEntrySpec | None:
    _check_unknown(ctx, item, path, ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount"))
    network = _str(ctx, item, "network", path)
    address = _str(ctx, item, "address", path, required=not network)
    if address:
        is_ip = check_ip(address) is None
        if static and not is_ip:
            ctx.error(f"{path}.address", f"{address!r} must be an IP address with resolution STATIC")
        elif not is_ip and not address.startswith("unix://") and not _HOSTNAME.match(address):
            ctx.error(f"{path}.address", f"{address!r} is not an IP address or hostname")
    ports: dict[str, int] = {}
    raw_ports = item.get("ports")
    if raw_ports is not None and not isinstance(raw_ports, dict):
        ctx.error(f"{path}.ports", f"must be a mapping of port name to number, got {_type_name(raw_ports)}")
    for name, number in (raw_ports or {}).items() if isinstance(raw_ports, dict) else ():
        checked = _port(ctx, number, f"{path}.ports[{name}]")
        if checked is not None:
            ports[str(name)] = checked
    labels = _labels(ctx, item.get("labels"), f"{path}.labels")
    weight = 0
    if item.get("weight") is not None:
        weight = _int(ctx, item["weight"], f"{path}.weight", 0, 2**32 - 1) or 0
    service_account = _str(ctx, item, "serviceAccount", path)
    if service_account and not _DNS_SUBDOMAIN.match(service_account):
        ctx.error(f"{path}.serviceAccount", f"{service_account!r} is not a valid service account name")
    return WorkloadEntrySpec(
        address=address,
        ports=MappingProxyType(ports),
        labels=MappingProxyType(labels),
        network=network,
        locality=_str(ctx, item, "locality", path),
        weight=weight,
        service_account=service_account,
    )


def _build_workload_entry(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> WorkloadEntry:
    spec = _mapping(ctx, doc, "spec", "", None, required=True)
    parsed = _workload_entry_spec(ctx, spec, "spec")
    if parsed is None:
        raise _Invalid
    return WorkloadEntry(meta, parsed)


# Istio's protocol.Parse, which reads them ignoring case; "" lets the proxy sniff.
_ISTIO_PROTOCOLS = frozenset(
    ("tcp", "udp", "grpc", "grpc-web", "http", "http_proxy", "http2", "https", "tls", "mongo", "redis", "mysql")
)


def _se_port(ctx: _Ctx, item: dict[Any, Any], path: str) -> ServiceEntryPort | None:
    _check_unknown(ctx, item, path, ("number", "protocol", "name", "targetPort"))
    if "number" not in item:
        ctx.error(f"{path}.number", "required field is missing")
        return None
    number = _port(ctx, item["number"], f"{path}.number")
    protocol = _str(ctx, item, "protocol", path)
    if protocol and protocol.lower() not in _ISTIO_PROTOCOLS:
        ctx.error(
            f"{path}.protocol",
            f"unknown protocol {protocol!r} (valid, any case: {', '.join(sorted(_ISTIO_PROTOCOLS))})",
        )
        protocol = ""
    target = 0
    if item.get("targetPort") is not None:
        target = _port(ctx, item["targetPort"], f"{path}.targetPort") or 0
    name = _str(ctx, item, "name", path)
    return None if number is None else ServiceEntryPort(number=number, protocol=protocol, name=name, target_port=target)


def _check_service_entry_host(host: str) -> str | None:
    if host == "*":
        return "'*' alone is not a valid host (it would claim every name)"
    return None if _HOSTNAME.match(host) else f"{host!r} is not a valid host"


def _build_service_entry(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> ServiceEntry:
    known = ("hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector", "exportTo")
    spec = _mapping(ctx, doc, "spec", "", (*known, "subjectAltNames"), required=True)
    hosts = _strings(ctx, spec, "hosts", "spec", _check_service_entry_host)
    if spec.get("hosts") is None or spec["hosts"] == []:  # Istio: at least one host
        ctx.error("spec.hosts", "required field is missing" if spec.get("hosts") is None else "must not be empty")
    addresses = _strings(ctx, spec, "addresses", "spec", check_ip_or_cidr)
    ports = _each(ctx, _list(ctx, spec, "ports", "spec"), "spec.ports", lambda d, p: _se_port(ctx, d, p))
    numbers = [p.number for p in ports]
    if len(set(numbers)) != len(numbers):
        ctx.error("spec.ports", "port numbers must be unique")
    port_names = [p.name for p in ports if p.name]
    if len(set(port_names)) != len(port_names):
        # Endpoints map their target ports by name: which of the two would `ports: {name: n}` override?
        ctx.error("spec.ports", "port names must be unique")
    location = _enum(ctx, spec, "location", "spec", ("MESH_EXTERNAL", "MESH_INTERNAL"), "MESH_EXTERNAL")
    resolution = _enum(ctx, spec, "resolution", "spec", ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"), "NONE")
    endpoints = _each(
        ctx,
        _list(ctx, spec, "endpoints", "spec"),
        "spec.endpoints",
        lambda d, p: _workload_entry_spec(ctx, d, p, static=resolution == "STATIC"),
    )
    if resolution == "NONE" and endpoints and spec.get("resolution") in (None, "NONE"):  # not a refused value
        # As Istio's webhook: with NONE the client's original destination is used, so the endpoints would be ignored.
        ctx.error("spec.endpoints", "not allowed with resolution NONE (connections keep their destination address)")
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not endpoints:
        # Each host is then its own endpoint, resolved by name (istiod's implicit endpoints): a wildcard is no name.
        for host in hosts:
            if "*" in host:
                ctx.error("spec.hosts", f"{host!r}: hosts must be FQDN when resolution {resolution} has no endpoints")
    for i, endpoint in enumerate(endpoints):
        for name in endpoint.ports:
            if name not in port_names:
                # A typo here would silently send the traffic to the service port's default target.
                ctx.error(f"spec.endpoints[{i}].ports[{name}]", "names no port of spec.ports")
    selector = _selector(ctx, spec, "workloadSelector", "spec", "labels")
    if selector is not None and endpoints:
        ctx.error("spec.workloadSelector", "cannot be combined with spec.endpoints")
    _strings(ctx, spec, "exportTo", "spec", None)
    return ServiceEntry(
        meta,
        hosts=hosts,
        addresses=addresses,
        ports=ports,
        location=location,
        resolution=resolution,
        endpoints=endpoints,
        workload_selector=MappingProxyType(selector) if selector is not None else None,
        subject_alt_names=_strings(ctx, spec, "subjectAltNames", "spec", None),
    )


# --- Istio security ---------------------------------------------------------------------------------------------

_SOURCE_CHECKS: Mapping[str, Callable[[str], str | None] | None] = {
    "principals": check_principal,
    "notPrincipals": check_principal,
    "requestPrincipals": _check_wildcard,
    "notRequestPrincipals": _check_wildcard,
    "namespaces": check_namespace_match,
    "notNamespaces": check_namespace_match,
    "serviceAccounts": check_service_account_match,
    "notServiceAccounts": check_service_account_match,
    "ipBlocks": check_ip_or_cidr,
    "notIpBlocks": check_ip_or_cidr,
    "remoteIpBlocks": check_ip_or_cidr,
    "notRemoteIpBlocks": check_ip_or_cidr,
}


def _check_service_account_form(value: str) -> str | None:
    """Istio's own check (CheckServiceAccount): no wildcard, `account` or `namespace/account`, both non-empty."""
    parts = value.split("/")
    if "*" in value or len(parts) > 2 or not all(parts) or len(value) > 320:
        return f"{value!r} must be <account> or <namespace>/<account>, without wildcards"
    return None


def _check_port_or_zero(value: str) -> str | None:
    """Istio's own check (ValidatePorts): 0-65535. Port 0 matches no connection."""
    if not is_decimal(value) or int(value) > 65535:
        return f"{value!r} is not a port number (0-65535)"
    return None


# For objects the API server holds (strict=False), the value checks this code adds beyond Istio's webhook give way
# to Istio's own (None: non-empty only). Refusing such an object drops the policy, and a dropped ALLOW policy can
# admit everyone; istiod sends these values as matches no connection meets (pilot/pkg/serviceregistry/ambient/
# authorization.go stringToMatch, stringToPort), so the ALLOW still stands. Files keep the stricter checks: there
# the author sees the error.
_API_VALUE_CHECKS: Mapping[Callable[[str], str | None], Callable[[str], str | None] | None] = {
    check_principal: None,
    check_namespace_match: None,
    _check_wildcard: None,
    check_service_account_match: _check_service_account_form,
    check_port_string: _check_port_or_zero,
}


def _value_check(ctx: _Ctx, check: Callable[[str], str | None] | None) -> Callable[[str], str | None] | None:
    """The check for AuthorizationPolicy match values from this source (see _API_VALUE_CHECKS)."""
    if ctx.strict or check is None:
        return check
    return _API_VALUE_CHECKS.get(check, check)


def _unsupported(ctx: _Ctx, data: dict[Any, Any], path: str, allowed: Iterable[str]) -> bool:
    """Unknown keys at a level of an AuthorizationPolicy rule: errors in strict mode; otherwise (objects the API
    server accepted, maybe from a newer Istio: `trustDomains`, ...) they are recorded for the rule, because
    ignoring a match field would widen an ALLOW rule. Returns whether any was recorded."""
    if ctx.strict:
        _check_unknown(ctx, data, path, allowed)
        return False
    unknown = [str(key) for key in data if key not in allowed]
    ctx.unsupported.extend(unknown)
    return bool(unknown)


def _source(ctx: _Ctx, item: dict[Any, Any], path: str) -> Source | None:
    _unsupported(ctx, item, path, ("source",))
    errors_before = len(ctx.errors)
    raw = _mapping(ctx, item, "source", path, None, required=True)
    full = f"{path}.source"
    newer = _unsupported(ctx, raw, full, _SOURCE_FIELDS.keys())
    values = {
        _SOURCE_FIELDS[k]: _strings(ctx, raw, k, full, _value_check(ctx, _SOURCE_CHECKS[k])) for k in _SOURCE_FIELDS
    }
    if not any(values.values()) and len(ctx.errors) == errors_before and not newer:
        ctx.error(full, "at least one field must be set")
    return Source(**values)


def _operation(ctx: _Ctx, item: dict[Any, Any], path: str) -> Operation | None:
    _unsupported(ctx, item, path, ("operation",))
    allowed = {*_OPERATION_STRING_FIELDS, "ports", "notPorts"}
    errors_before = len(ctx.errors)
    raw = _mapping(ctx, item, "operation", path, None, required=True)
    full = f"{path}.operation"
    newer = _unsupported(ctx, raw, full, allowed)
    values: dict[str, Any] = {
        _OPERATION_STRING_FIELDS[k]: _strings(ctx, raw, k, full, None) for k in _OPERATION_STRING_FIELDS
    }
    port_check, low = (check_port_string, 1) if ctx.strict else (_check_port_or_zero, 0)
    for key, attr in (("ports", "ports"), ("notPorts", "not_ports")):
        ports: list[int] = []
        for i, value in enumerate(_list(ctx, raw, key, full)):
            text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(text, str) or port_check(text) is not None:
                ctx.error(f"{full}.{key}[{i}]", f"{value!r} is not a port number ({low}-65535)")
            else:
                ports.append(int(text))
        values[attr] = tuple(ports)
    if not any(values.values()) and len(ctx.errors) == errors_before and not newer:
        ctx.error(full, "at least one field must be set")
    return Operation(**values)


def _is_map_key(key: str) -> bool:
    return key.startswith(_WHEN_KEY_PREFIXES) and key.endswith("]") and 0 < key.find("[") < len(key) - 2


def _condition(ctx: _Ctx, item: dict[Any, Any], path: str) -> Condition | None:
    _unsupported(ctx, item, path, ("key", "values", "notValues"))
    key = _str(ctx, item, "key", path, required=True)
    if key and key not in _WHEN_KEYS and not _is_map_key(key):
        if ctx.strict:
            ctx.error(f"{path}.key", f"unknown attribute {key!r}")
        else:  # a newer Istio's key: not evaluable here, like an HTTP attribute
            ctx.unsupported.append(key)
    check: Callable[[str], str | None] | None = None
    if key in ("source.ip", "destination.ip", "remote.ip"):
        check = check_ip_or_cidr
    elif key == "destination.port":
        check = check_port_string
    elif key == "source.principal":
        check = check_principal
    elif key == "source.namespace":
        check = check_namespace_match
    elif key == "source.serviceAccount":
        check = check_service_account_match
    elif key == "source.trustDomain":
        check = _check_wildcard
    check = _value_check(ctx, check)
    values = _strings(ctx, item, "values", path, check)
    not_values = _strings(ctx, item, "notValues", path, check)
    if not item.get("values") and not item.get("notValues"):
        # Empty lists too: the condition would match nothing, so an ALLOW rule holding it denies everything.
        ctx.error(path, "values or notValues must be set")
    return Condition(key=key, values=values, not_values=not_values)


def _rule(ctx: _Ctx, item: dict[Any, Any], path: str) -> Rule | None:
    ctx.unsupported = []
    _unsupported(ctx, item, path, ("from", "to", "when"))
    for key in ("from", "to"):
        if item.get(key) == []:
            # Istio's webhook refuses it. Read as absent, the rule would match every connection: an ALLOW whose
            # source list a template left empty ("nobody") would admit everyone.
            ctx.error(_join(path, key), "must not be empty")
    return Rule(
        from_=_each(ctx, _list(ctx, item, "from", path), f"{path}.from", lambda d, p: _source(ctx, d, p)),
        to=_each(ctx, _list(ctx, item, "to", path), f"{path}.to", lambda d, p: _operation(ctx, d, p)),
        when=_each(ctx, _list(ctx, item, "when", path), f"{path}.when", lambda d, p: _condition(ctx, d, p)),
        unsupported=tuple(dict.fromkeys(ctx.unsupported)),
    )


def _target_ref(ctx: _Ctx, item: dict[Any, Any], path: str) -> bool:
    _check_unknown(ctx, item, path, ("group", "kind", "name", "namespace", "sectionName"))
    _str(ctx, item, "kind", path, required=True)
    _str(ctx, item, "name", path, required=True)
    return True


def _build_authorization_policy(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> AuthorizationPolicy:
    known = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
    spec = _mapping(ctx, doc, "spec", "", known)
    _mapping(ctx, doc, "status", "", None)
    selector = _selector(ctx, spec, "selector", "spec", "matchLabels")
    has_refs = False
    if spec.get("targetRef") is not None:
        has_refs = _target_ref(ctx, _mapping(ctx, spec, "targetRef", "spec", None), "spec.targetRef")
    refs = _each(ctx, _list(ctx, spec, "targetRefs", "spec"), "spec.targetRefs", lambda d, p: _target_ref(ctx, d, p))
    has_refs = has_refs or bool(refs)
    if has_refs and selector is not None:
        ctx.error("spec.selector", "cannot be combined with targetRef/targetRefs")
    action = _enum(ctx, spec, "action", "spec", AUTHZ_ACTIONS, "ALLOW")
    provider = ""
    if spec.get("provider") is not None:
        provider = _str(ctx, _mapping(ctx, spec, "provider", "spec", ("name",)), "name", "spec.provider", required=True)
        if action != "CUSTOM":
            ctx.error("spec.provider", "only allowed with action CUSTOM")
    elif action == "CUSTOM":
        ctx.error("spec.provider", "required with action CUSTOM")
    rules = _each(ctx, _list(ctx, spec, "rules", "spec"), "spec.rules", lambda d, p: _rule(ctx, d, p))
    dry_run_text = meta.annotations.get(DRY_RUN_ANNOTATION)
    dry_run = _GO_BOOLS.get(dry_run_text or "", False)
    if dry_run_text is not None and dry_run_text not in _GO_BOOLS and action in ("ALLOW", "DENY"):
        # Istio's webhook refuses it too; istiod would enforce the policy, the opposite of what was asked.
        ctx.error(
            f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
            f"{dry_run_text!r} is not a boolean (true, false, 1, 0, t, f, True, False, TRUE, FALSE, T, F)",
        )
    return AuthorizationPolicy(
        meta,
        selector=MappingProxyType(selector) if selector is not None else None,
        has_target_refs=has_refs,
        action=action,
        provider=provider,
        rules=rules,
        dry_run=dry_run,
    )


DRY_RUN_ANNOTATION = "istio.io/dry-run"
# Go's strconv.ParseBool, which istiod reads the annotation with: "1" and "t" are true, "yes" and "tRue" are errors.
_GO_BOOLS: Mapping[str, bool] = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def _mtls_mode(ctx: _Ctx, value: Any, path: str) -> str:
    if value is None:
        return "UNSET"
    if not isinstance(value, dict):
        ctx.error(path, f"must be a mapping, got {_type_name(value)}")
        return "UNSET"
    _check_unknown(ctx, value, path, ("mode",))
    return _enum(ctx, value, "mode", path, MTLS_MODES, "UNSET")


def _build_peer_authentication(ctx: _Ctx, meta: Meta, doc: dict[Any, Any]) -> PeerAuthentication:
    spec = _mapping(ctx, doc, "spec", "", ("selector", "mtls", "portLevelMtls"))
    _mapping(ctx, doc, "status", "", None)
    selector = _selector(ctx, spec, "selector", "spec", "matchLabels")
    mode = _mtls_mode(ctx, spec.get("mtls"), "spec.mtls")
    port_level: dict[int, str] = {}
    raw_ports = _mapping(ctx, spec, "portLevelMtls", "spec", None)
    for key, value in raw_ports.items():
        path = f"spec.portLevelMtls[{key}]"
        number = int(key) if isinstance(key, str) and is_decimal(key) else key
        port = _port(ctx, number, path)
        mode_of_port = _mtls_mode(ctx, value, path)
        if port is not None:
            port_level[port] = mode_of_port
    if port_level and not selector:
        ctx.error("spec.portLevelMtls", "requires a workload selector (spec.selector.matchLabels)")
    return PeerAuthentication(
        meta,
        selector=MappingProxyType(selector) if selector is not None else None,
        mode=mode,
        port_level=MappingProxyType(port_level),
    )


_BUILDERS: Mapping[str, Callable[[_Ctx, Meta, dict[Any, Any]], KObject]] = {
    "Namespace": _build_namespace,
    "Node": _build_node,
    "Pod": _build_pod,
    "Service": _build_service,
    "EndpointSlice": _build_endpoint_slice,
    "ServiceEntry": _build_service_entry,
    "WorkloadEntry": _build_workload_entry,
    "AuthorizationPolicy": _build_authorization_policy,
    "PeerAuthentication": _build_peer_authentication,
}
