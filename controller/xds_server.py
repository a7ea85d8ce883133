"""Delta ADS server for the workload API (``istio.workload.Address``, ``istio.security.Authorization``).

Scale drives the shape of this module: with 10k workloads and 50 agents, encoding resources per client would
cost 50x the CPU. Each resource is therefore serialized exactly once per version, already framed as the
``resources`` field of a ``DeltaDiscoveryResponse``; a response to any client is the concatenation of those
frames plus a few header fields (protobuf allows fields in any order), handed to gRPC as bytes.

Each connection has its own sender task and a *dirty set* per type instead of a queue of responses: a slow
client only delays itself, and the changes that piled up while it was busy go out as one response holding the
latest versions. Changes are debounced server-wide (quiet period / maximum delay) so a burst becomes one push.

Subscriptions follow envoy's delta xDS rules, as istiod applies them for ztunnel. A stream whose first request of
a type subscribes to no names (or to ``*``) is *wildcard* and gets every resource: what agents use, and the path
the design above is for. A stream that subscribes to names (ztunnel's on-demand mode starts with ``*`` subscribed
and unsubscribed in one request: subscribed to nothing) gets only those names, their later changes and removals.
An Address may also be named by istiod's alias ``network/IP`` of a workload address or service VIP (ztunnel's
on-demand lookup key): the resources found are sent under their own names and subscribed from then on, as istiod
does. A name that does not exist is answered in ``removed_resources`` (as istiod does for on-demand lookups) and
is sent once it appears. Subscribing ``*`` later turns wildcard on (the whole state is resent); unsubscribing
``*`` turns it off, keeping the names subscribed explicitly. Names subscribed on a wildcard stream only take
effect then: the stream already holds every resource, so nothing is resent for them, and unsubscribing a name
sends no removal (the client drops it from its own cache).

Everything runs on the event loop that also serves the CA and the readiness probe, so the work a large change
brings is cut into pieces that share the loop (:class:`TurnShare`): encoding its resources, a chunk at a time, each
change committed to the served state whole once encoded (so no stream ever sees part of one change); marking the
connections in a flush, one at a time; and building their responses, a chunk of resources at a time. Measured
with 10,000 new pods and a few agents, the publish after a Kubernetes relist held the loop 0.15-0.38 s in one go.
istiod does this work in goroutines: a debounced push builds the shared state once, then a push queue hands it out
a connection at a time, at most PILOT_PUSH_THROTTLE at once (pilot/pkg/xds/discovery.go: debounce, doSendPushes).
Connections wait for the changes queued for encoding before building (a stream connecting meanwhile gets one full
response with all of them).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from api.istio.workload import workload_pb2 as wl_pb
from common.log import kv
from common.protojson import message_to_json
from controller.monitoring import ControllerMetrics

log = logging.getLogger("ambit.controller.xds")

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
# istiod's push order: addresses before the policies that refer to them.
PUSH_ORDER = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
SHORT_TYPE = {ADDRESS_TYPE: "address", AUTHORIZATION_TYPE: "authorization"}
WILDCARD = "*"

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD_NAME = "DeltaAggregatedResources"

# The largest request taken: an agent's resume request lists the name and version of every resource it holds, about
# 70 bytes each with pod names (blake2b versions: 16 characters), 16 MiB was reached near 230,000 resources.
# Kubernetes' documented ceiling of 150,000 pods, each with the longest names (a 63-character namespace and a
# 253-character pod: 357 bytes), comes to 51 MiB. istiod takes 4 MiB unless ISTIO_GPRC_MAXRECVMSGSIZE is raised
# (pilot/pkg/features/tuning.go; Istio 1.31's upgrade notes advise 32 MiB for large ambient meshes); past it
# ztunnel reconnects in a loop, and our agent subscribes afresh (agent/xds.py).
MAX_REQUEST_BYTES = 64 * 1024 * 1024

# Agents may receive the whole state in one response (ztunnel allows 200 MiB); keepalives let dead peers go.
GRPC_SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


# The loop time the server's bulk work (encoding a large change, a flush, building responses) may take per loop
# turn before it lets the loop serve others, and the pieces that work is cut into: ENCODE_CHUNK resources to encode
# (about 20 us each), one connection to mark in a flush, BUILD_CHUNK resources of a response. A change of at most
# ENCODE_CHUNK resources, with nothing queued before it, is applied at once.
TURN_BUDGET = 0.005
ENCODE_CHUNK = 100
# Resources a response gathers per piece (about 1-2 us each): one connection's response to a 10,000-pod change cost
# 10-30 ms of one turn built whole.
BUILD_CHUNK = 2000


class TurnShare:
    """Loop time for bulk work, handed out a piece at a time: a piece starts while the loop turn under way has
    spent less than ``budget`` seconds on such pieces, or has run none yet; otherwise its task yields until a later
    turn.

    Every task doing such work shares one instance, so the connections one flush wakes build their responses over
    several turns instead of all in the turn they woke in. A piece is not interrupted: the longest turn is about
    the budget plus one piece. ``budget`` 0 runs one piece per turn (tests count turns with it)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.yields = 0  # times a task handed its turn back to wait for a share, for logs
        self._started = -math.inf  # when the current share began
        self._fresh = False  # no piece ran in it yet
        self._renewing = False

    async def piece(self) -> None:
        """Wait until a piece may run in this loop turn."""
        while not self._fresh and time.monotonic() - self._started >= self.budget:
            if not self._renewing:
                # Scheduled before this task yields, so it runs first in the next turn: a new share for that turn.
                self._renewing = True
                asyncio.get_running_loop().call_soon(self._renew)
            self.yields += 1
            await asyncio.sleep(0)
        self._fresh = False

    def _renew(self) -> None:
        self._renewing = False
        self._fresh = True
        self._started = time.monotonic()


def resource_version(serialized: bytes) -> str:
    """Content hash: identical content keeps its version across controller restarts, so resumes skip it."""
    return hashlib.blake2b(serialized, digest_size=8).hexdigest()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# DeltaDiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto).
_F_SYSTEM_VERSION, _F_RESOURCES, _F_TYPE_URL, _F_NONCE, _F_REMOVED = 1, 2, 4, 5, 6


def encode_response(
    type_url: str, nonce: str, resources: Iterable[bytes], removed: Iterable[str], system_version: str = ""
) -> bytes:
    """A serialized DeltaDiscoveryResponse from resource frames made by :class:`ResourceTable`."""
    head = [_field(_F_TYPE_URL, type_url.encode()), _field(_F_NONCE, nonce.encode())]
    if system_version:
        head.append(_field(_F_SYSTEM_VERSION, system_version.encode()))
    head.extend(_field(_F_REMOVED, name.encode()) for name in removed)
    return b"".join(itertools.chain(head, resources))


def removed_fields(names: Iterable[str]) -> bytes:
    """``removed_resources`` fields of a DeltaDiscoveryResponse. Protobuf takes fields in any order and a repeated
    field's occurrences wherever they are, so these may also go among the resource frames."""
    return b"".join(_field(_F_REMOVED, name.encode()) for name in names)


def address_aliases(msg: Message) -> list[str]:
    """istiod's aliases of an Address (``AddressInfo.Aliases``): ``network/IP`` per workload address or service VIP."""
    if not isinstance(msg, wl_pb.Address):
        return []
    if msg.HasField("workload"):
        w = msg.workload
        pairs = [(w.network, raw) for raw in w.addresses]
    else:
        pairs = [(a.network, a.address) for a in msg.service.addresses]
    return [f"{net}/{ipaddress.ip_address(raw)}" for net, raw in pairs if len(raw) in (4, 16)]


# Which types have aliases besides their resource names.
ALIASES: dict[str, Callable[[Message], list[str]]] = {ADDRESS_TYPE: address_aliases}


@dataclass(frozen=True, slots=True)
class Entry:
    version: str
    frame: bytes  # the Resource, framed as DeltaDiscoveryResponse.resources, ready to concatenate
    message: Message  # for /debug/config_dump
    aliases: tuple[str, ...] | None = None  # worked out when encoded, if the table's alias index existed then


class ResourceTable:
    """The served state of one type URL: name -> current version and its pre-encoded frame.

    Changes are applied in two halves, so a large one can be encoded a chunk per loop turn and still change the
    served state in one go: :meth:`encode` (the cost: serializing, hashing, framing) and :meth:`commit`."""

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.entries: dict[str, Entry] = {}
        self._aliases = ALIASES.get(type_url)
        # alias -> resource names; built on the first alias lookup, so servers with only wildcard streams never pay.
        self._by_alias: dict[str, set[str]] | None = None
        self._snapshot: dict[str, Entry] | None = None

    def snapshot(self) -> Mapping[str, Entry]:
        """The entries as they are now, untouched by later commits (one copy, shared until the next commit): what a
        response built over several loop turns reads, so that no change committed meanwhile is half in it."""
        if self._snapshot is None:
            self._snapshot = dict(self.entries)
        return self._snapshot

    @property
    def has_aliases(self) -> bool:
        return self._aliases is not None

    def apply(self, changes: Mapping[str, Message | None]) -> set[str]:
        """Apply upserts (message) and removals (None); return the names whose served content changed."""
        return self.commit({n: None if msg is None else self.encode(n, msg) for n, msg in changes.items()})

    def encode(self, name: str, msg: Message) -> Entry:
        """The entry ``msg`` would be served as; the current one if its content is unchanged (nothing re-framed).
        Changes nothing: valid for :meth:`commit` while the table does not change in between."""
        value = msg.SerializeToString(deterministic=True)
        version = resource_version(value)
        old = self.entries.get(name)
        if old is not None and old.version == version:
            return old
        res = discovery_pb2.Resource(
            name=name, version=version, resource=any_pb2.Any(type_url=self.type_url, value=value)
        )
        aliases = tuple(self._aliases(msg)) if self._aliases is not None and self._by_alias is not None else None
        return Entry(version, _field(_F_RESOURCES, res.SerializeToString()), msg, aliases)

    def commit(self, encoded: Mapping[str, Entry | None]) -> set[str]:
        """Serve what :meth:`encode` made (None: removed); return the names whose served content changed."""
        changed: set[str] = set()
        for name, entry in encoded.items():
            old = self.entries.get(name)
            if entry is None:
                if old is not None:
                    del self.entries[name]
                    changed.add(name)
                    if self._by_alias is not None:
                        self._unindex(name, old)
                continue
            if old is not None and old.version == entry.version:
                continue
            self.entries[name] = entry
            changed.add(name)
            if self._by_alias is not None:
                if old is not None:
                    self._unindex(name, old)
                self._index(name, entry)
        if changed:
            self._snapshot = None
        return changed

    def aliases_of(self, name: str) -> list[str]:
        entry = self.entries.get(name)
        return self._aliases(entry.message) if entry is not None and self._aliases is not None else []

    def resolve(self, name: str) -> set[str]:
        """The resource names ``name`` stands for: itself if it is one, else those carrying it as an alias."""
        if name in self.entries:
            return {name}
        return set(self.named_by(name))

    def named_by(self, alias: str) -> Collection[str]:
        """The resource names carrying ``alias`` (read only)."""
        if self._aliases is None:
            return ()
        if self._by_alias is None:
            self._by_alias = {}
            for n, e in self.entries.items():
                self._index(n, e)
        return self._by_alias.get(alias, ())

    def _entry_aliases(self, entry: Entry) -> Iterable[str]:
        assert self._aliases is not None
        return entry.aliases if entry.aliases is not None else self._aliases(entry.message)

    def _index(self, name: str, entry: Entry) -> None:
        assert self._by_alias is not None
        for alias in self._entry_aliases(entry):
            self._by_alias.setdefault(alias, set()).add(name)

    def _unindex(self, name: str, entry: Entry) -> None:
        assert self._by_alias is not None
        for alias in self._entry_aliases(entry):
            names = self._by_alias.get(alias)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._by_alias[alias]


@dataclass
class AckEvent:
    """One ACK or NACK, for metrics and for benchmark drivers timing change-to-ACK latency."""

    connection: str
    node: str
    type_url: str
    nonce: str
    changed_at: float  # time.monotonic() of the oldest change the response carried (or of the request)
    sent_at: float
    acked_at: float
    error: str | None  # the NACK's error_detail.message; None for an ACK


@dataclass
class _Sent:
    type_url: str
    changed_at: float
    sent_at: float


@dataclass
class Subscription:
    """One stream's interest in one type: everything (wildcard) and/or the names it subscribed to explicitly."""

    wildcard: bool
    names: set[str] = field(default_factory=set)  # not filled from initial_resource_versions while wildcard (cost)


@dataclass
class XdsConnection:
    """Server-side state of one delta ADS stream."""

    id: str
    peer: str
    identity: str | None
    connected_at: float = field(default_factory=time.time)
    node_id: str = ""
    node_name: str = ""
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    # Types whose next response must be a full one: the client's initial_resource_versions, and request time.
    full: dict[str, tuple[dict[str, str], float]] = field(default_factory=dict)
    dirty: dict[str, set[str]] = field(default_factory=dict)
    dirty_since: dict[str, float] = field(default_factory=dict)
    full_built_at: dict[str, float] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    in_flight: OrderedDict[str, _Sent] = field(default_factory=OrderedDict)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    pushes: int = 0
    resources_sent: int = 0
    acks: int = 0
    nacks: int = 0
    last_nack: str = ""
    last_ack_nonce: str = ""

    @property
    def subscribed(self) -> Iterable[str]:
        """The type URLs this stream subscribed to."""
        return self.subscriptions.keys()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peer": self.peer,
            "identity": self.identity,
            "node_id": self.node_id,
            "node": self.node_name,
            "connected_at": self.connected_at,
            "subscribed": sorted(self.subscribed),
            "subscriptions": {
                SHORT_TYPE[t]: {"wildcard": s.wildcard, "resource_names": len(s.names)}
                for t, s in self.subscriptions.items()
            },
            "pushes": self.pushes,
            "resources_sent": self.resources_sent,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "last_ack_nonce": self.last_ack_nonce,
            "unacked": len(self.in_flight),
        }


# Checks a stream's invocation metadata; returns the authenticated caller or raises PermissionError.
Authenticator = Callable[[Mapping[str, str]], Awaitable[str]]


class DeltaSource(Protocol):
    """What the translator's Delta looks like to this server."""

    @property
    def addresses(self) -> Mapping[str, Message | None]: ...

    @property
    def authorizations(self) -> Mapping[str, Message | None]: ...


class InitialState(Protocol):
    def addresses(self) -> Mapping[str, Message]: ...

    def authorizations(self) -> Mapping[str, Message]: ...


_MAX_IN_FLIGHT = 64


class XdsServer:
    """Serves the current workload-API state to any number of delta ADS streams.

    Feed it with :meth:`apply_delta` (or :meth:`update`) on the event loop; it debounces and pushes.
    ``on_ack`` is called for every ACK/NACK (benchmarks use it to time delivery). ``turn_budget``,
    ``encode_chunk`` and ``build_chunk`` (default :data:`TURN_BUDGET`, :data:`ENCODE_CHUNK`, :data:`BUILD_CHUNK`)
    size the pieces its bulk work takes the loop for (module doc).
    """

    def __init__(
        self,
        translator: InitialState | None = None,
        *,
        metrics: ControllerMetrics | None = None,
        debounce_quiet: float = 0.02,
        debounce_max: float = 1.0,
        on_ack: Callable[[AckEvent], None] | None = None,
        turn_budget: float | None = None,
        encode_chunk: int | None = None,
        build_chunk: int | None = None,
    ) -> None:
        self.metrics = metrics or ControllerMetrics()
        self.debounce_quiet = debounce_quiet
        self.debounce_max = debounce_max
        self.on_ack = on_ack
        self.tables = {t: ResourceTable(t) for t in PUSH_ORDER}
        self.connections: dict[str, XdsConnection] = {}
        self._conn_ids = itertools.count(1)
        self._pending: dict[str, set[str]] = {}
        self._pending_since: float | None = None
        self._last_change = 0.0
        self._debounce_task: asyncio.Task[None] | None = None
        self._servers: list[grpc.aio.Server] = []
        self.share = TurnShare(TURN_BUDGET if turn_budget is None else turn_budget)
        self.encode_chunk = max(1, ENCODE_CHUNK if encode_chunk is None else encode_chunk)
        self.build_chunk = max(1, BUILD_CHUNK if build_chunk is None else build_chunk)
        # Changes waiting to be encoded, in order: (submitted at, changes by type URL). Until it is empty, every
        # change goes through it (order) and no response is built (the whole of them goes out, once).
        self._intake: collections.deque[tuple[float, dict[str, dict[str, Message | None]]]] = collections.deque()
        self._encoder: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # set while the intake is empty
        self._settled.set()
        self.generation = 0  # bumped per flushed change set; shown as system_version_info
        if translator is not None:
            self.tables[ADDRESS_TYPE].apply(translator.addresses())
            self.tables[AUTHORIZATION_TYPE].apply(translator.authorizations())
        self._count_resources()

    # ---- state changes -------------------------------------------------------------------------------------------

    def apply_delta(self, delta: DeltaSource) -> None:
        """Both types of a translator delta, served together (one change: addresses before policies)."""
        self._submit({ADDRESS_TYPE: delta.addresses, AUTHORIZATION_TYPE: delta.authorizations})

    def update(self, type_url: str, changes: Mapping[str, Message | None]) -> None:
        """Apply changes to the served state and schedule a debounced push; must run on the event loop.

        A change of more than ``encode_chunk`` resources, or any change while one is queued, is encoded by a task
        a chunk per piece of loop time and served whole when encoded, after those before it; a smaller one is
        served at once."""
        self._submit({type_url: changes})

    def _submit(self, changes: Mapping[str, Mapping[str, Message | None]]) -> None:
        for type_url in changes:
            if type_url not in self.tables:
                raise KeyError(f"not a served type: {type_url}")
        size = sum(len(c) for c in changes.values())
        if not size:
            return
        now = time.monotonic()
        if not self._intake and size <= self.encode_chunk:
            for type_url in PUSH_ORDER:
                if changes.get(type_url):
                    self._changed(type_url, self.tables[type_url].apply(changes[type_url]), now)
            return
        # Copied: the caller may reuse its mappings once this returns, as it could when they were applied at once.
        self._intake.append((now, {t: dict(c) for t, c in changes.items() if c}))
        self._settled.clear()
        if self._encoder is None:
            self._encoder = asyncio.get_running_loop().create_task(self._encode(), name="xds-encode")

    async def _encode(self) -> None:
        """Encode the queued changes a chunk per piece of loop time; serve each whole (one turn) once encoded."""
        started, resources, yields = time.monotonic(), 0, self.share.yields
        try:
            while self._intake:
                submitted, changes = self._intake[0]
                try:
                    staged: dict[str, dict[str, Entry | None]] = {}
                    for type_url, named in changes.items():
                        table, encoded = self.tables[type_url], staged.setdefault(type_url, {})
                        # One iterator over the intake's own copy (nothing changes it), not a list of its items: a
                        # (name, message) tuple per resource alive across turns is promoted to the collector's
                        # oldest generation and brings on full collections (see _build).
                        items = iter(named.items())
                        for _ in range(0, len(named), self.encode_chunk):
                            await self.share.piece()
                            for name, msg in itertools.islice(items, self.encode_chunk):
                                encoded[name] = None if msg is None else table.encode(name, msg)
                        resources += len(named)
                    await self.share.piece()  # the commit: about 0.2 us per resource
                except Exception:  # a message that does not serialize; the changes after it still apply
                    log.exception("xds change not applied", extra=kv(resources=sum(map(len, changes.values()))))
                    self._intake.popleft()
                    continue
                self._intake.popleft()
                for type_url in PUSH_ORDER:
                    if type_url in staged:
                        self._changed(type_url, self.tables[type_url].commit(staged[type_url]), submitted)
        except asyncio.CancelledError:  # stopping: what is not encoded yet is not served
            self._intake.clear()
            raise
        finally:
            self._encoder = None
            if not self._intake:
                self._settled.set()
        log.debug(
            "xds changes encoded in slices",
            extra=kv(
                resources=resources,
                yields=self.share.yields - yields,
                seconds=round(time.monotonic() - started, 3),
            ),
        )

    def _changed(self, type_url: str, changed: set[str], submitted: float) -> None:
        """Schedule the debounced push of what a change altered (``submitted``: when the change came in)."""
        if not changed:
            return
        self._pending.setdefault(type_url, set()).update(changed)
        if self._pending_since is None or submitted < self._pending_since:
            self._pending_since = submitted
        self._last_change = time.monotonic()
        if self._debounce_task is None:
            self._debounce_task = asyncio.get_running_loop().create_task(self._debounce())
        self._count_resources()

    def _count_resources(self) -> None:
        for t, table in self.tables.items():
            self.metrics.resources.labels(SHORT_TYPE[t]).set(len(table.entries))

    async def _debounce(self) -> None:
        try:
            while self._pending:  # changes made during a flush are debounced again
                assert self._pending_since is not None
                deadline = min(self._last_change + self.debounce_quiet, self._pending_since + self.debounce_max)
                delay = deadline - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                await self._flush()
        finally:
            self._debounce_task = None

    async def _flush(self) -> None:
        """Mark what changed dirty on every connection that wants it, a connection per piece of loop time."""
        pending, since, latest = self._pending, self._pending_since or time.monotonic(), self._last_change
        self._pending, self._pending_since = {}, None
        self.generation += 1
        for conn in list(self.connections.values()):
            await self.share.piece()
            if not conn.closed:
                self._mark(conn, pending, since, latest)

    def _mark(self, conn: XdsConnection, pending: Mapping[str, set[str]], since: float, latest: float) -> None:
        woke = False
        for type_url, names in pending.items():
            sub = conn.subscriptions.get(type_url)
            # A full response built after these changes (or still to be built) already carries them.
            if sub is None or type_url in conn.full or conn.full_built_at.get(type_url, -1.0) >= latest:
                continue
            wanted = names if sub.wildcard else self._wanted(self.tables[type_url], sub, names)
            if not wanted:
                continue
            conn.dirty.setdefault(type_url, set()).update(wanted)
            conn.dirty_since.setdefault(type_url, since)
            woke = True
        if woke:
            conn.wake.set()

    # ---- gRPC plumbing -------------------------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server, authenticate: Authenticator | None = None) -> None:
        """Register DeltaAggregatedResources on ``server`` (responses are pre-encoded bytes, see module doc)."""

        async def handler(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            await self._stream(request_iterator, context, authenticate)

        method = grpc.stream_stream_rpc_method_handler(
            handler,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=bytes,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD_NAME: method}),))

    async def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start a plaintext gRPC server for this state; returns the bound port (``port=0`` picks one)."""
        server = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        self.add_to_server(server)
        bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        await server.start()
        self._servers.append(server)
        log.info("xds listening", extra=kv(address=host, port=bound, tls=False))
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        if self._debounce_task is not None:
            self._debounce_task.cancel()
        if self._encoder is not None:
            self._encoder.cancel()
        for server in self._servers:
            await server.stop(grace)
        self._servers.clear()

    async def _stream(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
        authenticate: Authenticator | None,
    ) -> None:
        identity = None
        if authenticate is not None:
            md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            try:
                identity = await authenticate(md)
            except PermissionError as e:
                log.warning("xds stream rejected", extra=kv(peer=context.peer(), reason=str(e)))
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        conn = XdsConnection(id=f"{context.peer()}-{next(self._conn_ids)}", peer=context.peer(), identity=identity)
        self.connections[conn.id] = conn
        self.metrics.xds_clients.inc()
        log.info("xds stream opened", extra=kv(connection=conn.id, identity=identity))
        reader = asyncio.get_running_loop().create_task(self._read(conn, request_iterator))
        try:
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                while self._intake and not conn.closed:  # what is queued goes out with the rest, in one response
                    await self._settled.wait()
                if conn.closed:
                    break
                await self._send_pending(conn, context)
        finally:
            reader.cancel()
            del self.connections[conn.id]
            self.metrics.xds_clients.dec()
            log.info("xds stream closed", extra=kv(connection=conn.id, node=conn.node_name, pushes=conn.pushes))

    async def _read(
        self, conn: XdsConnection, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]
    ) -> None:
        try:
            async for req in request_iterator:
                self.handle_request(conn, req)
        except (grpc.aio.AioRpcError, grpc.RpcError) as e:
            log.info("xds stream read ended", extra=kv(connection=conn.id, error=str(e)))
        finally:
            conn.closed = True
            conn.wake.set()

    def handle_request(self, conn: XdsConnection, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Sans-IO request handling: subscription, ACK and NACK bookkeeping; wakes the sender when needed."""
        if req.HasField("node") and not conn.node_id:
            conn.node_id = req.node.id
            md = req.node.metadata.fields
            conn.node_name = md["NODE_NAME"].string_value if "NODE_NAME" in md else req.node.id
            if conn.identity is not None and conn.node_name != conn.identity:
                # The state is the same for every node, so this grants nothing; it does point at a misconfiguration.
                log.warning(
                    "xds node name differs from the authenticated node",
                    extra=kv(connection=conn.id, node=conn.node_name, authenticated=conn.identity),
                )
        type_url = req.type_url
        if type_url not in self.tables:
            log.warning("xds request for unknown type ignored", extra=kv(connection=conn.id, type=type_url))
            return
        if req.response_nonce:
            self._on_ack(conn, req)
            if not (req.resource_names_subscribe or req.resource_names_unsubscribe):
                return
        sub = conn.subscriptions.get(type_url)
        if sub is None:
            self._subscribe(conn, req)
        else:
            self._change_subscription(conn, sub, req)

    def _subscribe(self, conn: XdsConnection, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """The first request of a type on this stream: it is answered even when there is nothing to send."""
        names = set(req.resource_names_subscribe).difference(req.resource_names_unsubscribe)
        # envoy: a first request that names nothing is a (legacy) wildcard subscription.
        wildcard = not req.resource_names_subscribe or WILDCARD in names
        names.discard(WILDCARD)
        if not wildcard:
            # What the client already holds stays subscribed across a reconnect (istiod does the same; ztunnel
            # lists its on-demand names there and does not subscribe them again).
            names.update(req.initial_resource_versions)
        conn.subscriptions[req.type_url] = Subscription(wildcard, names)
        self._full_response(conn, req.type_url, dict(req.initial_resource_versions))
        if not wildcard:
            log.info(
                "xds on-demand subscription",
                extra=kv(connection=conn.id, type=SHORT_TYPE[req.type_url], resource_names=len(names)),
            )

    @staticmethod
    def _wanted(table: ResourceTable, sub: Subscription, changed: set[str]) -> set[str]:
        """The changed names a non-wildcard stream wants: its own, and new ones carrying an alias it subscribed.

        Whichever is smaller is walked: the changed names (their aliases worked out) or the subscribed names
        (looked up in the table's alias index): an on-demand stream naming a few addresses costs little in a flush
        of 10,000 changes."""
        wanted = changed & sub.names
        if not table.has_aliases:
            return wanted
        if len(sub.names) < len(changed):
            carriers = {n for alias in sub.names for n in table.named_by(alias) if n in changed}
        else:
            carriers = {n for n in changed - wanted if any(a in sub.names for a in table.aliases_of(n))}
        carriers -= wanted
        sub.names |= carriers
        wanted |= carriers
        return wanted

    @staticmethod
    def _lookup(table: ResourceTable, sub: Subscription, names: Iterable[str]) -> tuple[set[str], list[str]]:
        """Resource names to send for the names a non-wildcard stream asked for, and the names that do not exist.

        Resources found through an alias are subscribed under their own names too (istiod's bookkeeping), so their
        later changes and removal reach the stream.
        """
        found: set[str] = set()
        missing: list[str] = []
        for name in names:
            resolved = table.resolve(name)
            if resolved:
                found |= resolved
            else:
                missing.append(name)
        sub.names |= found
        return found, missing

    def _full_response(self, conn: XdsConnection, type_url: str, initial: dict[str, str]) -> None:
        conn.full[type_url] = (initial, time.monotonic())
        conn.dirty.pop(type_url, None)
        conn.dirty_since.pop(type_url, None)
        conn.wake.set()

    def _change_subscription(
        self, conn: XdsConnection, sub: Subscription, req: discovery_pb2.DeltaDiscoveryRequest
    ) -> None:
        """A later request naming resources to add or drop; newly wanted names are sent (or answered removed)."""
        type_url = req.type_url
        subscribe = [n for n in req.resource_names_subscribe if n != WILDCARD]
        unsubscribe = set(req.resource_names_unsubscribe)
        added = {n for n in subscribe if n not in sub.names}
        sub.names.update(added)
        sub.names.difference_update(unsubscribe)
        was_wildcard = sub.wildcard
        sub.wildcard = (was_wildcard or WILDCARD in req.resource_names_subscribe) and WILDCARD not in unsubscribe
        log.debug(
            "xds subscription changed",
            extra=kv(
                connection=conn.id,
                type=SHORT_TYPE[type_url],
                wildcard=sub.wildcard,
                added=len(added),
                removed=len(unsubscribe),
            ),
        )
        if sub.wildcard:
            if not was_wildcard:
                # What the client holds is not tracked per name: resend everything.
                self._full_response(conn, type_url, {})
            return
        added.difference_update(unsubscribe)
        if not added or type_url in conn.full:  # a full response still to be built covers every subscribed name
            return
        conn.dirty.setdefault(type_url, set()).update(added)
        conn.dirty_since.setdefault(type_url, time.monotonic())
        conn.wake.set()

    def _on_ack(self, conn: XdsConnection, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        now = time.monotonic()
        sent = conn.in_flight.pop(req.response_nonce, None)
        short = SHORT_TYPE[req.type_url]
        error = None
        if req.HasField("error_detail") and (req.error_detail.code != 0 or req.error_detail.message):
            error = req.error_detail.message or f"code {req.error_detail.code}"
            conn.nacks += 1
            conn.last_nack = error
            self.metrics.xds_rejects.labels(short).inc()
            log.warning(
                "xds NACK",
                extra=kv(connection=conn.id, node=conn.node_name, type=short, nonce=req.response_nonce, error=error),
            )
        else:
            conn.acks += 1
            conn.last_ack_nonce = req.response_nonce
        if sent is None:
            return
        if error is None:
            self.metrics.xds_ack_time.labels(short).observe(now - sent.changed_at)
        if self.on_ack is not None:
            self.on_ack(
                AckEvent(
                    conn.id, conn.node_name, req.type_url, req.response_nonce, sent.changed_at, sent.sent_at, now, error
                )
            )

    def build_pending(self, conn: XdsConnection, type_url: str) -> tuple[bytes, int, float] | None:
        """The next response for ``conn`` and ``type_url`` (body, resource count, oldest change), or None."""
        steps = self._build(conn, type_url)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _build(self, conn: XdsConnection, type_url: str) -> Generator[None, None, tuple[bytes, int, float] | None]:
        """:meth:`build_pending`'s work, yielding between chunks of ``build_chunk`` resources (the sender lets the
        loop run there). A build that yields reads the table's snapshot from its start: a change committed
        meanwhile is not half in it, and goes out in the next response."""
        table = self.tables[type_url]
        sub = conn.subscriptions[type_url]
        chunk = self.build_chunk
        parts: list[bytes] = []  # resource frames and removed_resources fields, joined a chunk at a time
        count = 0
        if type_url in conn.full:
            initial, since = conn.full.pop(type_url)
            conn.dirty.pop(type_url, None)
            conn.dirty_since.pop(type_url, None)
            conn.full_built_at[type_url] = time.monotonic()
            if sub.wildcard:
                big = len(table.entries) + len(initial) > chunk
                entries = table.snapshot() if big else table.entries
                # Walked with one iterator (the snapshot does not change; the live table is walked in one go),
                # not a list of its items: that was a (name, entry) tuple per resource alive across the build's
                # turns, which the collector promotes to its oldest generation; with 50 agents subscribing at
                # once, 10,000 resources each, that brought full collections (0.13-0.24 s over the whole heap)
                # twice as often and doubled the time to deliver them the state.
                items = iter(entries.items())
                for at in range(0, len(entries), chunk):
                    if at:
                        yield
                    frames = [e.frame for n, e in itertools.islice(items, chunk) if initial.get(n) != e.version]
                    parts.append(b"".join(frames))
                    count += len(frames)
                held = list(initial)
                for at in range(0, len(held), chunk):
                    if big:
                        yield
                    removed = [n for n in held[at : at + chunk] if n not in entries]
                    parts.append(removed_fields(removed))
                    count += len(removed)
            else:
                found, removed = self._lookup(table, sub, list(sub.names))
                entries = table.entries
                frames = [entries[n].frame for n in found if initial.get(n) != entries[n].version]
                parts += [b"".join(frames), removed_fields(removed)]
                count += len(frames) + len(removed)
        elif conn.dirty.get(type_url):
            names = conn.dirty.pop(type_url)
            since = conn.dirty_since.pop(type_url)
            if sub.wildcard:
                entries = table.snapshot() if len(names) > chunk else table.entries
                listed = list(names)
                for at in range(0, len(listed), chunk):
                    if at:
                        yield
                    frames, removed = [], []
                    for n in listed[at : at + chunk]:
                        entry = entries.get(n)
                        if entry is None:
                            removed.append(n)
                        else:
                            frames.append(entry.frame)
                    parts += [b"".join(frames), removed_fields(removed)]
                    count += len(frames) + len(removed)
            else:
                names &= sub.names  # some may have been unsubscribed since they changed
                if not names:
                    return None
                found, removed = self._lookup(table, sub, names)
                entries = table.entries
                frames = [entries[n].frame for n in found]
                parts += [b"".join(frames), removed_fields(removed)]
                count += len(frames) + len(removed)
        else:
            return None
        nonce = f"{next(conn.nonces):x}"
        body = encode_response(type_url, nonce, parts, (), system_version=str(self.generation))
        conn.in_flight[nonce] = _Sent(type_url, since, time.monotonic())
        while len(conn.in_flight) > _MAX_IN_FLIGHT:
            conn.in_flight.popitem(last=False)
        return body, count, since

    async def _send_pending(self, conn: XdsConnection, context: grpc.aio.ServicerContext) -> None:
        for type_url in PUSH_ORDER:
            if type_url not in conn.subscribed or not (type_url in conn.full or conn.dirty.get(type_url)):
                continue
            steps = self._build(conn, type_url)
            while True:
                # The connections a flush woke build theirs over several loop turns, a chunk per piece.
                await self.share.piece()
                if conn.closed:
                    steps.close()
                    return
                try:
                    next(steps)
                except StopIteration as done:
                    built = done.value
                    break
            if built is None:
                continue
            body, count, since = built
            await context.write(body)
            short = SHORT_TYPE[type_url]
            conn.pushes += 1
            conn.resources_sent += count
            self.metrics.xds_pushes.labels(short).inc()
            self.metrics.xds_push_resources.labels(short).inc(count)
            self.metrics.xds_push_time.labels(short).observe(time.monotonic() - since)

    # ---- introspection -------------------------------------------------------------------------------------------

    def describe_connections(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.connections.values()]

    def config_dump(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "resources": {
                SHORT_TYPE[t]: [
                    {"name": n, "version": e.version, "resource": message_to_json(e.message)}
                    for n, e in sorted(table.entries.items())
                ]
                for t, table in self.tables.items()
            },
        }
