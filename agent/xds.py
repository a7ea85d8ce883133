"""Delta ADS client of the workload API, as ztunnel's xds client behaves.

- Wildcard subscription to ``istio.workload.Address`` and ``istio.security.Authorization``.
- Every response is ACKed or NACKed by nonce. A NACK's ``error_detail.message`` is ``"name: reason; ..."`` for
  the resources that could not be decoded or validated; the valid resources of that response still apply. An
  Address with a port above 65535 is one (ztunnel's ``as u16`` would wrap it). An Authorization is not refused for
  malformed IP entries or ports in its matches (ztunnel keeps it too): agent.rbac reads each the restrictive way,
  and each is logged with its policy and path and counted in ``ambit_xds_authorization_malformed_entries``.
- ``ready`` is set once a response of every type has been applied and ACKed, as ztunnel counts a type synced
  only on its first ACK: a NACKed first response keeps the agent not ready (:meth:`XdsClient.not_ready_reason`
  says which type and why) until a later response of that type applies cleanly. It stays set after that.
- Reconnects with exponential backoff (10 ms doubling to 15 s), each delay jittered by +-20% (gRPC's connection
  backoff) so that agents that lost the controller together do not come back in lockstep. The backoff resets
  after a stream that delivered a response, whatever status ended it, as gRPC's xDS client (A57) and Envoy
  (GrpcStream::onReceiveMessage) do: ztunnel's reset events alone (gRPC Unknown/Cancelled/DeadlineExceeded,
  "transport is closing", "received prior goaway", a clean end) kept a backoff grown in an earlier outage, so a
  controller lost abruptly later (UNAVAILABLE) was retried only after up to 15 s. A stream ended before any
  response never resets it: a controller (or a proxy in front of it) that ends every stream before answering
  would otherwise have every agent reconnect, asking for the full state, each 10 ms. Nor does one the agent ended
  on a response it could not take (undecodable, over 200 MiB): the next stream would be sent it again.
- On every (re)connect the first request of each type carries ``initial_resource_versions`` with what the store
  holds, so the controller resends only what changed. That request grows with the store (about 70 bytes a
  resource with pod names) and a server refuses one above its receive limit (istiod: 4 MiB by default,
  ISTIO_GPRC_MAXRECVMSGSIZE; ztunnel then reconnects in a loop, Istio 1.31 upgrade notes). When the controller
  fails a stream with RESOURCE_EXHAUSTED "larger than max (N vs. LIMIT)" before answering, the agent remembers
  LIMIT and from then on subscribes afresh (no versions) to a type whose request would exceed it; the first
  response of that type on the stream holds the whole state (a wildcard subscription's first response), so what
  the store holds and it does not is removed, as the versions would have made the controller say.
- The last good state is written atomically to ``<state-dir>/xds-state.pb`` (length-prefixed
  ``DeltaDiscoveryResponse`` messages, one per type) so an agent restarted while the controller is down starts
  from it (:meth:`XdsClient.restore`); only once ``ready`` (or restored), so that it holds a whole configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import struct
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, message_factory, struct_pb2
from google.protobuf.message import DecodeError, Message

from agent.controller_channel import DEFAULT_SERVER_NAME, ControllerChannel, RpcError
from agent.prometheus import Counter, Registry
from agent.rbac import MAX_PORT, MalformedEntry, malformed_entries
from agent.state import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    WorkloadStore,
    address_name,
    policy_key,
)
from api.istio.security import authorization_pb2 as authz_pb
from api.istio.workload import workload_pb2 as wl_pb
from common.files import write_atomic
from common.log import kv

log = logging.getLogger("ambit.agent.xds")

TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
STATE_FILE = "xds-state.pb"
_STATE_MAGIC = b"AMBIT-XDS-STATE-1\n"
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
_INVALID_ARGUMENT = 3
# Resources decoded and applied per event-loop turn (XdsClient.receive): 5-10 ms of work at 25-50 us each.
APPLY_CHUNK = 200
_MAX_REASON = 400  # a NACK can name thousands of resources; a readiness body need not
# A server's refusal of a request over its receive limit: grpc-core "Received message larger than max (N vs. M)",
# grpc-go "grpc: received message larger than max (N vs. M)". istiod's rate limit is RESOURCE_EXHAUSTED as well.
_TOO_LARGE = re.compile(r"larger than max(?: \((\d+) vs\. (\d+)\))?", re.IGNORECASE)

# By name, so that both our channel's RpcError and grpc's AioRpcError (tests, tools) are understood.
_RESETTING_CODES = frozenset({"UNKNOWN", "CANCELLED", "DEADLINE_EXCEEDED"})
_RESETTING_MESSAGES = ("transport is closing", "received prior goaway")


class RpcStatus(Protocol):
    """What the backoff rules read from a failed stream."""

    def code(self) -> Enum: ...

    def details(self) -> str | None: ...


# ---- decoding and validation (sans-IO) -------------------------------------------------------------------------


def _valid_ip(raw: bytes) -> bool:
    return len(raw) in (4, 16)


def _unknown(enum: Any, field: str, value: int) -> str | None:
    """proto3 keeps enum values it does not know as plain integers; ztunnel refuses them (``try_from``), and so do
    we: read as the nearest known value, an unknown policy action became ALLOW."""
    if value in enum.DESCRIPTOR.values_by_number:  # a dict: ``enum.values()`` built a list per call (11k per sync)
        return None
    return f"{field} {value} is not one of {', '.join(enum.keys())}"


def _port_error(field: str, value: int) -> str | None:
    if value <= MAX_PORT:
        return None
    return f"{field} {value} is not a port (above {MAX_PORT})"


def _gateway_port_error(field: str, gateway: wl_pb.GatewayAddress) -> str | None:
    return _port_error(f"{field}.hbone_mtls_port", gateway.hbone_mtls_port)


def _port_list_error(field: str, ports: Iterable[wl_pb.Port]) -> str | None:
    for i, port in enumerate(ports):
        reason = _port_error(f"{field}[{i}].service_port", port.service_port) or _port_error(
            f"{field}[{i}].target_port", port.target_port
        )
        if reason is not None:
            return reason
    return None


def _all_ports_fit(ports: Iterable[wl_pb.Port]) -> bool:
    return all(port.service_port <= MAX_PORT and port.target_port <= MAX_PORT for port in ports)


def _ports_fit(addr: wl_pb.Address) -> bool:
    """Whether every port field of ``addr`` is a port: :func:`address_port_error`'s quick answer."""
    if addr.HasField("workload"):
        w = addr.workload
        for plist in w.services.values():
            if not _all_ports_fit(plist.ports):
                return False
        return (
            w.waypoint.hbone_mtls_port <= MAX_PORT
            and w.network_gateway.hbone_mtls_port <= MAX_PORT
            and w.application_tunnel.port <= MAX_PORT
        )
    s = addr.service
    if not _all_ports_fit(s.ports) or s.waypoint.hbone_mtls_port > MAX_PORT:
        return False
    return all(weighted.destination.hbone_mtls_port <= MAX_PORT for weighted in s.weighted_waypoints)


def address_port_error(addr: wl_pb.Address) -> str | None:
    """The first port field of ``addr`` above 65535, named by its path. The protos carry ports as uint32; ztunnel
    converts them with ``as u16`` (src/state/workload.rs: service and target ports, waypoint and network gateway
    ``hbone_mtls_port``, the application tunnel port), so 65616 silently became 80 and traffic went to a port nobody
    configured. Refused here instead: the Address is NACKed and the agent keeps what it held."""
    if _ports_fit(addr):
        return None  # the common case, checked without building a path per port (~1/3 of a full sync's CPU)
    if addr.HasField("workload"):
        w = addr.workload
        for key, plist in w.services.items():
            reason = _port_list_error(f"workload.services[{key!r}].ports", plist.ports)
            if reason is not None:
                return reason
        return (
            _gateway_port_error("workload.waypoint", w.waypoint)
            or _gateway_port_error("workload.network_gateway", w.network_gateway)
            or _port_error("workload.application_tunnel.port", w.application_tunnel.port)
        )
    s = addr.service
    reason = _port_list_error("service.ports", s.ports) or _gateway_port_error("service.waypoint", s.waypoint)
    if reason is not None:
        return reason
    for i, weighted in enumerate(s.weighted_waypoints):
        reason = _gateway_port_error(f"service.weighted_waypoints[{i}].destination", weighted.destination)
        if reason is not None:
            return reason
    return None


def validate_address(name: str, addr: wl_pb.Address) -> str | None:
    """Why this Address cannot be used, or None. Checks what the data path relies on."""
    reason = address_port_error(addr)
    if reason is not None:
        return reason
    if addr.HasField("workload"):
        w = addr.workload
        if not w.uid:
            return "workload has no uid"
        if name != w.uid:
            return f"resource name does not match workload uid {w.uid!r}"
        reason = _unknown(wl_pb.TunnelProtocol, "tunnel_protocol", w.tunnel_protocol) or _unknown(
            wl_pb.NetworkMode, "network_mode", w.network_mode
        )
        if reason is not None:
            return reason
        for ip in w.addresses:
            if not _valid_ip(ip):
                return f"workload address of {len(ip)} bytes is not an IPv4/IPv6 address"
        return None
    if addr.HasField("service"):
        s = addr.service
        if not s.hostname or not s.namespace:
            return "service needs namespace and hostname"
        if name != address_name(addr):
            return f"resource name does not match service {address_name(addr)!r}"
        for a in s.addresses:
            if not _valid_ip(a.address):
                return f"service address of {len(a.address)} bytes is not an IPv4/IPv6 address"
            if a.HasField("length") and a.length > len(a.address) * 8:
                return f"service address prefix length {a.length} is longer than the address"
        return None
    return "address has neither workload nor service"


def validate_authorization(name: str, policy: authz_pb.Authorization) -> str | None:
    if not policy.name:
        return "policy has no name"
    if name != policy_key(policy):
        return f"resource name does not match policy {policy_key(policy)!r}"
    # Malformed IP entries and ports in its matches do not reject a policy: ztunnel keeps the policy too (src/rbac.rs
    # drops such an IP entry), and refusing it would leave a new DENY unenforced, or a new ALLOW missing, which with
    # no other ALLOW admits everybody. agent.rbac reads each one the safe way; decode_response lists them.
    return _unknown(authz_pb.Action, "action", policy.action) or _unknown(authz_pb.Scope, "scope", policy.scope)


_DECODERS: dict[str, tuple[type[Message], Callable[[str, Any], str | None]]] = {
    ADDRESS_TYPE: (wl_pb.Address, validate_address),
    AUTHORIZATION_TYPE: (authz_pb.Authorization, validate_authorization),
}


@dataclass
class DecodedDelta:
    type_url: str
    upserts: dict[str, tuple[Any, str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (resource name, reason)
    # Malformed entries of accepted policies, read the safe way by agent.rbac: (resource name, version, entry).
    dropped: list[tuple[str, str, MalformedEntry]] = field(default_factory=list)
    # The Resource each upsert came from, for the state file: with a name twice in a response, not a later
    # copy that was rejected.
    sources: dict[str, discovery_pb2.Resource] = field(default_factory=dict)

    def serialized_sources(self) -> dict[str, bytes]:
        return {name: res.SerializeToString() for name, res in self.sources.items()}


def decode_response(resp: discovery_pb2.DeltaDiscoveryResponse) -> DecodedDelta:
    """Decode and validate every resource; bad ones become errors and do not stop the good ones."""
    out = DecodedDelta(resp.type_url, removed=list(resp.removed_resources))
    if resp.type_url not in _DECODERS:
        out.errors.append((resp.type_url, "unsupported type URL"))
        out.removed = []
        return out
    _decode_into(out, resp.resources)
    return out


def _decode_into(out: DecodedDelta, resources: Sequence[discovery_pb2.Resource]) -> dict[str, tuple[Any, str]]:
    """Decode and validate ``resources`` (of ``out``'s type) into ``out``; returns the upserts they brought."""
    cls, validate = _DECODERS[out.type_url]
    typed = [res.resource.type_url == out.type_url for res in resources]
    parsed = _parse_together(cls, [res.resource.value for res, ok in zip(resources, typed, strict=True) if ok])
    upserts: dict[str, tuple[Any, str]] = {}
    for res, ok in zip(resources, typed, strict=True):
        name = res.name
        if not ok:
            out.errors.append((name, f"resource type {res.resource.type_url!r} in a {out.type_url} response"))
            continue
        if parsed is not None:
            msg = next(parsed)
        else:
            try:
                msg = cls.FromString(res.resource.value)
            except DecodeError as e:
                out.errors.append((name, f"cannot decode: {e}"))
                continue
        reason = validate(name, msg)
        if reason is not None:
            out.errors.append((name, reason))
            continue
        if out.type_url == AUTHORIZATION_TYPE:
            if name in out.upserts:  # what applies, with a name twice, is the later copy
                out.dropped = [d for d in out.dropped if d[0] != name]
            out.dropped.extend((name, res.version, entry) for entry in malformed_entries(msg))
        upserts[name] = out.upserts[name] = (msg, res.version)
        out.sources[name] = res
    return upserts


_BATCH_CLASSES: dict[str, type[Message]] = {}


def _batch_class(cls: type[Message]) -> type[Message]:
    """A message type with one field, ``repeated <cls> items = 1``, added to ``cls``'s descriptor pool (its items
    are then instances of ``cls`` itself); made once per type."""
    full_name = cls.DESCRIPTOR.full_name
    found = _BATCH_CLASSES.get(full_name)
    if found is not None:
        return found
    package = "ambit.agent.xds_batch"
    name = full_name.replace(".", "_")
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"ambit/agent/xds_batch/{name}.proto",
        package=package,
        syntax="proto3",
        dependency=[cls.DESCRIPTOR.file.name],
    )
    msg = proto.message_type.add(name=name)
    msg.field.add(
        name="items",
        number=1,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=f".{full_name}",
    )
    pool = cls.DESCRIPTOR.file.pool
    pool.AddSerializedFile(proto.SerializeToString())
    descriptor: Any = pool.FindMessageTypeByName(f"{package}.{name}")
    made = _BATCH_CLASSES[full_name] = message_factory.GetMessageClass(descriptor)
    return made


def _parse_together(cls: type[Message], values: list[bytes]) -> Iterator[Any] | None:
    """``values`` parsed as ``cls`` messages that share one upb arena, or None when one of them does not decode (the
    caller then decodes them one by one, to name the bad ones). Each message parsed alone takes an arena of its own:
    10,000 workload Addresses of 220 bytes on the wire held 21 MB that way, 10 MB parsed 500 to an arena. An arena
    lives while one of its messages does, so a state that changes bit by bit keeps at most that much more."""
    if len(values) < 2:
        return None
    wire = b"".join(b"\x0a" + _varint(len(v)) + v for v in values)  # field 1, length-delimited, once per value
    try:
        batch = _batch_class(cls).FromString(wire)
    except DecodeError:
        return None
    return iter(list(batch.items))  # type: ignore[attr-defined]


def nack_message(errors: list[tuple[str, str]]) -> str:
    """ztunnel's NACK text: ``"name: reason; name: reason"``."""
    return "; ".join(f"{name}: {reason}" for name, reason in errors)


def ack_request(decoded: DecodedDelta, nonce: str) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=decoded.type_url, response_nonce=nonce)
    if decoded.errors:
        req.error_detail.code = _INVALID_ARGUMENT
        req.error_detail.message = nack_message(decoded.errors)
    return req


# ---- on-disk state ---------------------------------------------------------------------------------------------


class StateFileError(Exception):
    """The state file exists but cannot be used."""


def encode_state(resources: Mapping[str, Mapping[str, bytes]]) -> bytes:
    """type URL -> name -> serialized Resource; one length-prefixed DeltaDiscoveryResponse per type."""
    parts = [_STATE_MAGIC]
    for type_url, by_name in resources.items():
        resp = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url)
        body = resp.SerializeToString() + b"".join(_frame_resource(r) for r in by_name.values())
        parts.append(struct.pack(">I", len(body)))
        parts.append(body)
    return b"".join(parts)


def _frame_resource(serialized: bytes) -> bytes:
    # DeltaDiscoveryResponse.resources is field 2, length-delimited.
    return b"\x12" + _varint(len(serialized)) + serialized


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_state(data: bytes) -> list[discovery_pb2.DeltaDiscoveryResponse]:
    if not data.startswith(_STATE_MAGIC):
        raise StateFileError("not an ambit xDS state file")
    pos, out = len(_STATE_MAGIC), []
    while pos < len(data):
        if pos + 4 > len(data):
            raise StateFileError("truncated")
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise StateFileError("truncated")
        try:
            out.append(discovery_pb2.DeltaDiscoveryResponse.FromString(data[pos : pos + length]))
        except DecodeError as e:
            raise StateFileError(f"corrupt: {e}") from None
        pos += length
    return out


class XdsMetrics:
    """ztunnel's xDS client metrics (src/xds/metrics.rs names), registered in the agent's registry."""

    def __init__(self, registry: Registry) -> None:
        self.terminations = Counter(
            "istio_xds_connection_terminations", "xDS streams ended, by reason", ["reason"], registry=registry
        )
        self.messages = Counter("istio_xds_message", "xDS responses received, by type URL", ["url"], registry=registry)
        self.message_bytes = Counter(
            "istio_xds_message_bytes", "Bytes of xDS responses received, by type URL", ["url"], registry=registry
        )
        # Not ztunnel's (it drops such entries without a word): what an operator needs to find a policy that is
        # enforced otherwise than written.
        self.malformed_entries = Counter(
            "ambit_xds_authorization_malformed_entries",
            "Malformed IP and port entries of accepted authorization policies, read the restrictive way, by field",
            ["field"],
            registry=registry,
        )


def termination_reason(error: RpcStatus | None, established: bool) -> str:
    """ztunnel's label for a stream's end (src/xds/client.rs run_loop): "Complete" for a clean end,
    "ConnectionError" for a stream that failed before it was established (tonic's Error::Connection, whatever the
    status), then "Reconnect" for its expected disconnects and "Error" for the rest. ``established``: the stream
    delivered a response (gRPC servers send the response headers with the first message)."""
    if error is None:
        return "Complete"
    if not established:
        return "ConnectionError"
    return "Reconnect" if resets_backoff(error) else "Error"


# ---- the client ------------------------------------------------------------------------------------------------


class Backoff:
    """10 ms doubling to 15 s, reset after a stream that delivered a response; each delay is jittered by ``jitter``
    (a fraction, either way) and never exceeds ``maximum``."""

    def __init__(
        self, initial: float = 0.01, maximum: float = 15.0, *, jitter: float = 0.2, rng: random.Random | None = None
    ) -> None:
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self.current = initial
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self.current * (1 + self._rng.uniform(-self.jitter, self.jitter))
        self.current = min(self.maximum, self.current * 2)
        return min(self.maximum, delay)

    def reset(self) -> None:
        self.current = self.initial


def resets_backoff(error: RpcStatus | None) -> bool:
    """Whether ztunnel sees an expected disconnect (it resets its backoff on these; here they label the termination
    metric). None is a clean end of stream."""
    if error is None:
        return True
    details = (error.details() or "").lower()
    return error.code().name in _RESETTING_CODES or any(m in details for m in _RESETTING_MESSAGES)


def _step(
    steps: Generator[None, None, discovery_pb2.DeltaDiscoveryRequest],
) -> discovery_pb2.DeltaDiscoveryRequest | None:
    """One step of a response's application (XdsClient._handle_steps): None while it goes on, then its ACK or NACK."""
    try:
        next(steps)
    except StopIteration as done:
        ack: discovery_pb2.DeltaDiscoveryRequest = done.value
        return ack
    return None


class XdsClient:
    """Keeps ``store`` in step with the controller; ``await run()`` forever (cancel to stop).

    ``root_cert`` (PEM file of the controller's CA) switches to TLS; ``token_file`` adds
    ``authorization: Bearer <token>``. Both files are re-read on every connect (rotation). The agent passes the
    ``channel`` it shares with the CA client (then ``root_cert`` and ``server_name`` are the channel's business).
    """

    def __init__(
        self,
        store: WorkloadStore,
        address: str,
        node: str,
        *,
        node_ip: str = "",
        state_dir: Path | str | None = None,
        token_file: Path | str | None = None,
        root_cert: Path | str | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        cluster_id: str = "Kubernetes",
        backoff: Backoff | None = None,
        registry: Registry | None = None,
        channel: ControllerChannel | None = None,
    ) -> None:
        self.store = store
        self.address = address
        self.node = node
        self.node_ip = node_ip
        self.state_path = Path(state_dir) / STATE_FILE if state_dir else None
        self.token_file = Path(token_file) if token_file else None
        self._own_channel = channel is None
        self.channel = channel or ControllerChannel(address, root_cert_file=root_cert, server_name=server_name)
        self.cluster_id = cluster_id
        self.backoff = backoff or Backoff()
        self.ready = asyncio.Event()
        self.connected = False
        self.restored = False
        self._restore_tried = False  # the state file is read once per process: at start, or first in run()
        self.stats: dict[str, Any] = {
            "attempts": 0,
            "connects": 0,
            "responses": 0,
            "acks": 0,
            "nacks": 0,
            "last_nack": "",
            "last_error": "",
            "malformed_entries": 0,
        }
        self.metrics = XdsMetrics(registry) if registry is not None else None
        self._synced_types: set[str] = set()  # types with an ACKed response: ready once all are here
        self._rejected: dict[str, str] = {}  # type -> NACK text, while that type has had no ACKed response
        # Serialized Resource per name: what the state file holds (the good ones only).
        self._good: dict[str, dict[str, bytes]] = {t: {} for t in TYPES}
        self._save_wanted = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None
        # The largest request the controller takes, once it refused a resume (None: not known to be limited).
        self.resume_limit: int | None = None
        # On the current stream: byte size of each type's first request that carried versions, and the types
        # subscribed afresh, whose first response replaces what the store holds.
        self._resume_sizes: dict[str, int] = {}
        self._fresh: set[str] = set()

    def node_proto(self) -> base_pb2.Node:
        """ztunnel's node identity shape, so istiod would accept this agent too."""
        ns = "istio-system"
        md = struct_pb2.Struct()
        md.update(
            {
                "NODE_NAME": self.node,
                "NAME": f"ambit-agent-{self.node}",
                "NAMESPACE": ns,
                "INSTANCE_IPS": self.node_ip,
                "CLUSTER_ID": self.cluster_id,
            }
        )
        return base_pb2.Node(
            id=f"ztunnel~{self.node_ip or '0.0.0.0'}~ambit-agent-{self.node}.{ns}~{ns}.svc.cluster.local",
            cluster=self.cluster_id,
            metadata=md,
        )

    # ---- restore / save ----------------------------------------------------------------------------------------

    def _read_state(self) -> bytes | None:
        if self.state_path is None:
            return None
        try:
            return self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read xDS state file", extra=kv(file=str(self.state_path), error=e.strerror))
            return None

    def restore(self, data: bytes | None = None) -> bool:
        """Load the state file (or ``data``) into the store; run() does this first unless it was done. True if
        something loaded."""
        self._restore_tried = True
        if data is None:
            data = self._read_state()
        if data is None:
            return False
        try:
            responses = decode_state(data)
        except StateFileError as e:
            log.error("ignoring xDS state file", extra=kv(file=str(self.state_path), error=str(e)))
            return False
        count = 0
        for resp in responses:
            if resp.type_url not in _DECODERS:
                # Written by another agent version (or damaged): the store has no place for it, and raising here
                # would stop the xDS client at every start until the file went away.
                log.warning("state file type skipped", extra=kv(file=str(self.state_path), type=resp.type_url))
                continue
            decoded = decode_response(resp)
            if decoded.errors:
                log.warning("state file entries skipped", extra=kv(errors=nack_message(decoded.errors)))
            self.store.apply(decoded.type_url, decoded.upserts, ())
            self._report_malformed(decoded, "state file")
            self._good[decoded.type_url].update(decoded.serialized_sources())
            count += len(decoded.upserts)
        self.restored = True
        log.info("xDS state restored from disk", extra=kv(file=str(self.state_path), resources=count))
        return True

    async def _save_loop(self) -> None:
        """Coalesces saves: at most one write in flight, the latest state wins. Cancelled (the client stops), it
        lets the write in flight finish and then writes what is still wanted: an agent stopped within a save's
        pause after an update restarted, with the controller away, from the state before it."""
        writing: asyncio.Future[None] | None = None
        try:
            while True:
                await self._save_wanted.wait()
                writing = self._write_state()
                await asyncio.shield(writing)  # a cancelled wait leaves the thread writing: never two at once
                await asyncio.sleep(0.2)
        finally:
            if writing is not None and not writing.done():
                await writing
            if self._save_wanted.is_set():
                await self._write_state()

    def _write_state(self) -> asyncio.Future[None]:
        assert self.state_path is not None
        self._save_wanted.clear()
        data, path = encode_state(self._good), self.state_path

        def write() -> None:
            try:
                write_atomic(path, data, 0o644, parents=True)
            except OSError as e:
                log.error("cannot write xDS state file", extra=kv(file=str(path), error=str(e)))

        return asyncio.ensure_future(asyncio.to_thread(write))

    # ---- connection loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.state_path is not None and not self._restore_tried and not self.ready.is_set():
            data = await asyncio.to_thread(self._read_state)
            if data is not None:
                self.restore(data)
        if self.state_path is not None and self._saver is None:
            self._saver = asyncio.get_running_loop().create_task(self._save_loop())
        try:
            while True:
                error: RpcError | None = None
                local_failure = False
                answered = False
                try:
                    await self._session()
                    log.info("xds stream ended by the server", extra=kv(controller=self.address))
                except RpcError as e:
                    error = e
                    self.stats["last_error"] = f"{e.code().name}: {e.details()}"
                    log.warning(
                        "xds stream failed",
                        extra=kv(controller=self.address, code=e.code().name, details=e.details()),
                    )
                except OSError as e:  # unreadable root cert or token file
                    local_failure = True
                    self.stats["last_error"] = str(e)
                    log.error("xds connection not attempted", extra=kv(controller=self.address, error=str(e)))
                except Exception as e:  # a bug here or in a store subscriber, a token not in UTF-8: retry, never stop
                    local_failure = True
                    self.stats["last_error"] = f"{type(e).__name__}: {e}"
                    log.exception("xds session failed unexpectedly", extra=kv(controller=self.address))
                finally:
                    answered, self.connected = self.connected, False
                if error is not None and not answered:
                    self._note_refused_resume(error)
                if self.metrics is not None:
                    reason = "Error" if local_failure else termination_reason(error, answered)
                    self.metrics.terminations.labels(reason).inc()
                if answered and not local_failure and not (error is not None and error.unusable_response):
                    self.backoff.reset()
                await asyncio.sleep(self.backoff.next_delay())
        finally:
            if self._saver is not None:
                saver, self._saver = self._saver, None
                saver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await saver  # its last write
            if self._own_channel:
                await self.channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("clusterid", self.cluster_id)]
        if self.token_file is not None:
            md.append(("authorization", f"Bearer {self.token_file.read_text().strip()}"))
        return md

    def initial_requests(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        """Wildcard subscription per type, resuming from the versions the store holds; node on the first. A type
        whose request would exceed :attr:`resume_limit` is subscribed afresh instead (module docstring)."""
        reqs = [
            discovery_pb2.DeltaDiscoveryRequest(type_url=t, initial_resource_versions=self.store.versions(t))
            for t in TYPES
        ]
        reqs[0].node.CopyFrom(self.node_proto())
        self._resume_sizes, self._fresh = {}, set()
        for req in reqs:
            if not req.initial_resource_versions:
                continue
            size = req.ByteSize()
            if self.resume_limit is not None and size > self.resume_limit:
                log.warning(
                    "xds subscribing afresh: resume request over the controller's limit",
                    extra=kv(
                        type=req.type_url,
                        resources=len(req.initial_resource_versions),
                        bytes=size,
                        limit=self.resume_limit,
                    ),
                )
                req.ClearField("initial_resource_versions")
                self._fresh.add(req.type_url)
            else:
                self._resume_sizes[req.type_url] = size
        return reqs

    def _note_refused_resume(self, error: RpcStatus) -> None:
        """A stream failed before any response: if the controller refused a resume request as too large, keep its
        limit so that the next streams subscribe afresh where it would be exceeded."""
        if error.code().name != "RESOURCE_EXHAUSTED" or getattr(error, "unusable_response", False):
            return
        found = _TOO_LARGE.search(error.details() or "")
        if found is None or not self._resume_sizes:
            return
        largest = max(self._resume_sizes.values())
        limit = int(found.group(2)) if found.group(2) else largest - 1
        if largest <= limit:
            return  # not one of our resume requests (they fit)
        self.resume_limit = limit if self.resume_limit is None else min(limit, self.resume_limit)
        log.warning(
            "xds resume request refused as too large; subscribing afresh from now on",
            extra=kv(controller=self.address, bytes=largest, limit=self.resume_limit, details=error.details()),
        )

    async def _session(self) -> None:
        metadata = self._metadata()
        async with self.channel.stream(ADS_METHOD, discovery_pb2.DeltaDiscoveryResponse, metadata) as call:
            self.stats["attempts"] += 1
            for req in self.initial_requests():
                await call.send(req)
            async for resp in call:
                if not self.connected:
                    self.connected = True
                    self.stats["connects"] += 1
                    log.info("xds connected", extra=kv(controller=self.address))
                await call.send(await self.receive(resp))

    def handle_response(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        """Apply one response to the store and return its ACK or NACK (sans-IO), in one go."""
        steps = self._handle_steps(resp)
        while (ack := _step(steps)) is None:
            pass
        return ack

    async def receive(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        """:meth:`handle_response`, giving the event loop back every :data:`APPLY_CHUNK` resources: the whole state of
        a 10,000-pod cluster took 0.5-1 s to decode and apply, and a 1,000-pod update ~100 ms, during which no
        connection was relayed or accepted. Addresses are applied chunk by chunk (each resource is whole, and
        the controller could have sent them in as many responses), stale ones of a fresh subscription last so that
        nothing still there goes missing meanwhile; the policies of a response are applied together, as a DENY
        replacing an ALLOW must not let everybody in between. A subclass's own :meth:`handle_response` (tests record
        or damage responses there) is honoured, and applies a response in one go."""
        if type(self).handle_response is not XdsClient.handle_response:
            return self.handle_response(resp)
        steps = self._handle_steps(resp)
        while True:
            ack = _step(steps)
            if ack is not None:
                return ack
            await asyncio.sleep(0)  # the loop runs between chunks

    def _handle_steps(
        self, resp: discovery_pb2.DeltaDiscoveryResponse
    ) -> Generator[None, None, discovery_pb2.DeltaDiscoveryRequest]:
        """The work of one response; yields between chunks, returns the ACK or NACK."""
        started = time.monotonic()
        stale: list[str] = []
        if resp.type_url not in _DECODERS:
            decoded = decode_response(resp)
        else:
            decoded = DecodedDelta(resp.type_url, removed=list(resp.removed_resources))
            if resp.type_url in self._fresh:
                # The whole state after a fresh subscription: what it does not name is gone (a rejected resource is
                # named, and keeps its previous version).
                self._fresh.discard(resp.type_url)
                named = {res.name for res in resp.resources}.union(decoded.removed)
                stale = [n for n in self.store.versions(resp.type_url) if n not in named]
                log.info(
                    "xds state replaced after a fresh subscription", extra=kv(type=resp.type_url, removed=len(stale))
                )
            resources = resp.resources
            by_chunk = resp.type_url == ADDRESS_TYPE
            removed: list[str] = decoded.removed
            for first in range(0, len(resources), APPLY_CHUNK):
                if first:
                    yield
                chunk = resources[first : first + APPLY_CHUNK]
                upserts = _decode_into(decoded, chunk)
                if by_chunk:
                    self._apply(resp.type_url, upserts, decoded.sources, removed)
                    removed = []
            if by_chunk:
                self._apply(resp.type_url, {}, decoded.sources, removed + stale)
            else:
                self._apply(resp.type_url, decoded.upserts, decoded.sources, decoded.removed + stale)
            decoded.removed.extend(stale)
            self._report_malformed(decoded, f"nonce {resp.nonce}")
        self.stats["responses"] += 1
        if self.metrics is not None:
            self.metrics.messages.labels(resp.type_url).inc()
            self.metrics.message_bytes.labels(resp.type_url).inc(resp.ByteSize())
        ack = ack_request(decoded, resp.nonce)
        if decoded.errors:
            self.stats["nacks"] += 1
            self.stats["last_nack"] = ack.error_detail.message
            log.warning("xds NACK", extra=kv(type=resp.type_url, nonce=resp.nonce, error=ack.error_detail.message))
        else:
            self.stats["acks"] += 1
        log.debug(
            "xds response applied",
            extra=kv(
                type=resp.type_url,
                resources=len(resp.resources),
                removed=len(resp.removed_resources),
                ms=round((time.monotonic() - started) * 1000, 2),
            ),
        )
        if resp.type_url in _DECODERS:
            if not self.ready.is_set():
                self._track_sync(resp.type_url, ack.error_detail.message if decoded.errors else None)
            # Only a whole configuration is one to restart from: before every type synced (a first sync cut short,
            # or its policies rejected) the file would hold workloads without their policies, and an agent
            # restarted from it with the controller away enforced none. A store restored from the file is whole
            # from the start (a rejected update keeps the previous version), so it is saved as it changes.
            if self.ready.is_set() or self.restored:
                self._save_wanted.set()
        return ack

    def _apply(
        self,
        type_url: str,
        upserts: Mapping[str, tuple[Any, str]],
        sources: Mapping[str, discovery_pb2.Resource],
        removed: list[str],
    ) -> None:
        """Apply to the store, and to what the state file holds. A rejected update leaves the previous version in
        the store and the file; its version differs from the server's, so a resume asks for it again."""
        if not upserts and not removed:
            return
        self.store.apply(type_url, upserts, removed)
        good = self._good[type_url]
        for name in removed:
            good.pop(name, None)
        for name in upserts:
            good[name] = sources[name].SerializeToString()

    def _report_malformed(self, decoded: DecodedDelta, source: str) -> None:
        """Log and count the malformed entries of the policies just applied: accepted (ACKed, as ztunnel does), but
        enforced otherwise than the controller sent them (agent.rbac's restrictive reading)."""
        for name, version, entry in decoded.dropped:
            policy = decoded.upserts[name][0]
            self.stats["malformed_entries"] += 1
            if self.metrics is not None:
                self.metrics.malformed_entries.labels(entry.field).inc()
            log.warning(
                "authorization policy entry malformed",
                extra=kv(
                    policy=name,
                    version=version,
                    action=authz_pb.Action.Name(policy.action),
                    dry_run=policy.dry_run,
                    entry=entry.path,
                    value=entry.value,
                    reading=entry.reading,
                    source=source,
                ),
            )

    def _track_sync(self, type_url: str, error: str | None) -> None:
        if error is not None:
            if type_url not in self._synced_types:
                self._rejected[type_url] = error
                log.warning("xds not ready: configuration rejected", extra=kv(type=type_url, error=error))
            return
        self._synced_types.add(type_url)
        self._rejected.pop(type_url, None)
        if self._synced_types.issuperset(TYPES):
            self.ready.set()
            log.info("xds ready", extra=kv(controller=self.address))

    @property
    def has_config(self) -> bool:
        """The store holds a whole configuration to act on: the controller's (``ready``), or the last good one from
        the state file, which keeps a node serving while its agent restarts with the controller down."""
        return self.ready.is_set() or self.restored

    def not_ready_reason(self) -> str:
        """Why ``ready`` is not set (for /healthz/ready); empty once it is."""
        if self.ready.is_set():
            return ""
        rejected = [f"{t.rsplit('.', 1)[-1]}: {self._rejected[t]}" for t in TYPES if t in self._rejected]
        if rejected:
            text = "; ".join(rejected)
            if len(text) > _MAX_REASON:
                text = text[: _MAX_REASON - 3] + "..."
            return f"configuration from the controller rejected ({text})"
        return "waiting for the first full configuration from the controller"
