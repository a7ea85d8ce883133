"""The redirect program's pinned maps as seen from user space: layouts mirrored from bpf/ambit_maps.h, address key
packing, and map access by pinned path.

Access goes through plain bpf(2) calls on map fds (agent/redirect_syscalls.py) rather than BCC table objects: the
agent never loads BCC (the loader child compiles), cleanup and adoption must work on pins alone, and a layout check
has to run *before* the loader's BCC silently reuses a pinned map whose key or value size no longer matches.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agent import redirect_syscalls as sysbpf
from agent.redirect_errors import RedirectKernelError, RedirectPinError

LAYOUT_VERSION = 4  # AMBIT_LAYOUT_VERSION
AF_INET = 2
AF_INET6 = 10

# Interface roles and loader bookkeeping (AMBIT_IF_*, AMBIT_LOADER_*).
IF_POD = 0x1
IF_UPLINK = 0x2
IF_BRIDGE = 0x4  # a bridge whose ports carry the program
IF_BRIDGE_PORT = 0x8  # a port of such a bridge (ambit_bridge_ports)
LOADER_OWNS_QDISC = 0x1

BPF_ANY = 0
BPF_NOEXIST = 1

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9


class AmbitAddr(ct.Structure):
    _fields_ = [("family", ct.c_uint8), ("pad", ct.c_uint8 * 3), ("addr", ct.c_uint8 * 16)]


class WlCounters(ct.Structure):
    _fields_ = [
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("conns_out", ct.c_uint64),
        ("conns_in", ct.c_uint64),
        ("drops", ct.c_uint64),
    ]


class ConnKey(ct.Structure):
    """struct ambit_conn_key: a TCP connection's addresses and ports (ports in network order)."""

    _fields_ = [
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
    ]


class IfaceEntry(ct.Structure):
    _fields_ = [("flags", ct.c_uint32), ("loader_flags", ct.c_uint32)]


class BridgePort(ct.Structure):
    _fields_ = [("bridge", ct.c_uint32), ("mac", ct.c_uint8 * 6), ("pad", ct.c_uint8 * 2)]


class ConfigEntry(ct.Structure):
    _fields_ = [
        ("outbound_port", ct.c_uint16),
        ("inbound_port", ct.c_uint16),
        ("hbone_port", ct.c_uint16),
        ("fail_open", ct.c_uint8),
        ("early_demux_saved", ct.c_uint8),
        ("mark", ct.c_uint32),
        ("mark_mask", ct.c_uint32),
        ("layout_version", ct.c_uint32),
        ("netns_cookie", ct.c_uint64),
    ]


# (map type, key size, value size, max entries): what the kernel reports of a map, and all a layout check can see.
Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    counters_only: bool = False  # nothing but counters in it: a layout migration may replace it (counts restart)

    @property
    def percpu(self) -> bool:
        return self.map_type in (BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY)

    @property
    def shape(self) -> Shape:
        return (self.map_type, self.key_size, self.value_size, self.max_entries)


# Index -> name of ambit_stats entries (AMBIT_STAT_*).
STAT_NAMES = (
    "assign_existing",
    "capture_outbound",
    "capture_inbound",
    "capture_hbone",
    "drop_no_listener",
    "pass_no_listener",
    "drop_assign_error",
    "unparsed",
    "drop_spoofed",
    "pass_agent",
)

WORKLOADS = MapSpec("ambit_workloads", BPF_MAP_TYPE_PERCPU_HASH, ct.sizeof(AmbitAddr), ct.sizeof(WlCounters), 16384)
HOMES = MapSpec("ambit_wl_home", BPF_MAP_TYPE_HASH, ct.sizeof(AmbitAddr), 4, 16384)  # address -> ifindex
IFACES = MapSpec("ambit_ifaces", BPF_MAP_TYPE_HASH, 4, ct.sizeof(IfaceEntry), 4096)
IF_SPOOFED = MapSpec("ambit_if_spoofed", BPF_MAP_TYPE_PERCPU_HASH, 4, 8, 4096, counters_only=True)
BRIDGE_PORTS = MapSpec("ambit_bridge_ports", BPF_MAP_TYPE_HASH, 4, ct.sizeof(BridgePort), 4096)
AGENT_CONNS = MapSpec("ambit_agent_conns", BPF_MAP_TYPE_LRU_HASH, ct.sizeof(ConnKey), 1, 16384)
CONFIG = MapSpec("ambit_config", BPF_MAP_TYPE_ARRAY, 4, ct.sizeof(ConfigEntry), 1)
STATS = MapSpec("ambit_stats", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(STAT_NAMES), counters_only=True)
ALL_MAPS = (WORKLOADS, HOMES, IFACES, IF_SPOOFED, BRIDGE_PORTS, AGENT_CONNS, CONFIG, STATS)


def _family_and_bytes(ip: str) -> tuple[int, bytes]:
    """The key's family and network-order address (4 or 16 bytes; keys zero the rest); ValueError on non-IP text."""
    addr = ipaddress.ip_address(ip)
    return (AF_INET if addr.version == 4 else AF_INET6), addr.packed


def pack_addr(ip: str) -> AmbitAddr:
    """Map key for a workload address; raises ValueError on text that is not an IP address."""
    key = AmbitAddr()
    key.family, packed = _family_and_bytes(ip)
    ct.memmove(key.addr, packed, len(packed))
    return key


def pack_conn(src: tuple[str, int], dst: tuple[str, int]) -> ConnKey:
    """Map key for the connection src -> dst; raises ValueError on addresses that are not IPs or of two families."""
    family, saddr = _family_and_bytes(src[0])
    dst_family, daddr = _family_and_bytes(dst[0])
    if family != dst_family:
        raise ValueError(f"{src[0]} and {dst[0]} are of different address families")
    key = ConnKey()
    key.family = family
    ct.memmove(key.saddr, saddr, len(saddr))
    ct.memmove(key.daddr, daddr, len(daddr))
    key.sport = socket.htons(src[1])
    key.dport = socket.htons(dst[1])
    return key


def unpack_addr(key: AmbitAddr) -> str:
    raw = bytes(key.addr)
    if key.family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if key.family == AF_INET6:
        return str(ipaddress.IPv6Address(raw))
    raise ValueError(f"unknown address family {key.family} in map key")


def possible_cpus() -> int:
    """Per-CPU map values carry one slot per *possible* CPU (not online), as the kernel sizes them."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class _MapInfo(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    ]


def _mismatch(path: str, got: Shape, want: Shape) -> RedirectPinError:
    return RedirectPinError(
        f"pinned map {path} has (type, key size, value size, max entries) {got}, this agent expects "
        f"{want}: the pins come from an incompatible Ambit version; run `ambit-agent --cleanup` first"
    )


@dataclass(frozen=True)
class PinMigration:
    """What brings an older layout's pin directory to this one: maps a later layout added are created empty, and
    counters-only maps whose shape changed are replaced (their counts restart at zero). Maps holding state
    (enrollment, interfaces, config) are never reinterpreted: a change there is refused by :func:`plan_migration`."""

    create: tuple[MapSpec, ...] = ()
    replace: tuple[MapSpec, ...] = ()

    def describe(self) -> list[str]:
        return [f"created {s.name}" for s in self.create] + [f"replaced {s.name}, counts reset" for s in self.replace]


def plan_migration(pin_dir: str, layout: int, found: Mapping[str, Shape | None]) -> PinMigration:
    """Sans-IO core of :func:`migrate_pins`. ``layout`` is the pins' recorded AMBIT_LAYOUT_VERSION (0: never
    recorded), ``found`` the shape of each of our maps present in ``pin_dir`` (None: absent). Pins of a newer
    layout are refused even when every shape still fits: the meaning of a field may have changed."""
    if layout > LAYOUT_VERSION:
        raise RedirectPinError(
            f"pins in {pin_dir} have layout {layout}, newer than this agent's {LAYOUT_VERSION}: a newer Ambit wrote "
            "them; run that version, or `ambit-agent --cleanup` first"
        )
    create: list[MapSpec] = []
    replace: list[MapSpec] = []
    for spec in ALL_MAPS:
        got = found.get(spec.name)
        if got is None:
            create.append(spec)
        elif got != spec.shape:
            if not spec.counters_only:
                raise _mismatch(os.path.join(pin_dir, spec.name), got, spec.shape)
            replace.append(spec)
    return PinMigration(tuple(create), tuple(replace))


def migrate_pins(pin_dir: str) -> list[str]:
    """Bring ``pin_dir`` to this agent's layout before anything opens it (BCC reuses pins it finds without a size
    check, so this has to run before a compile). Returns what changed; raises RedirectPinError when the pins cannot
    be used (newer layout, changed state map). An already-attached older program keeps its own map objects until
    the agent swaps the filters, so capture goes on meanwhile."""
    found = {spec.name: _pinned_shape(os.path.join(pin_dir, spec.name)) for spec in ALL_MAPS}
    layout = read_pinned_config(pin_dir).layout_version if found[CONFIG.name] == CONFIG.shape else 0
    plan = plan_migration(pin_dir, layout, found)
    for spec in plan.create:
        _pin_new_map(spec, os.path.join(pin_dir, spec.name))
    for spec in plan.replace:
        path = os.path.join(pin_dir, spec.name)
        fresh = path + "_migrating"  # bpffs refuses names with a dot
        _pin_new_map(spec, fresh)
        try:
            os.rename(fresh, path)  # atomic: the pin is always one map or the other
        except OSError as exc:
            raise RedirectPinError(f"cannot replace {path}: {exc.strerror}") from exc
    return plan.describe()


def read_pinned_config(pin_dir: str) -> ConfigEntry:
    """ambit_config on its own: its layout is the same in every version, so it can be read before a migration
    (owner netns, recorded layout). Zeroes when it was never written."""
    config = PinnedMap.open(CONFIG, pin_dir)
    try:
        raw = config.lookup_raw(ct.c_uint32(0))
    finally:
        config.close()
    return ConfigEntry.from_buffer_copy(raw) if raw else ConfigEntry()


def _pinned_shape(path: str) -> Shape | None:
    try:
        fd = sysbpf.obj_get(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RedirectPinError(f"cannot open pinned map {path}: {exc.strerror}") from exc
    try:
        return _shape_of(fd, path)
    finally:
        os.close(fd)


def _shape_of(fd: int, path: str) -> Shape:
    info = _MapInfo()
    try:
        sysbpf.obj_info(fd, info)
    except OSError as exc:
        raise RedirectPinError(f"cannot read map info of {path}: {exc.strerror}") from exc
    return (info.type, info.key_size, info.value_size, info.max_entries)


def _pin_new_map(spec: MapSpec, path: str) -> None:
    try:
        os.unlink(path)  # a leftover of an interrupted migration (only ever a temporary name or an absent map)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RedirectPinError(f"cannot remove {path}: {exc.strerror}") from exc
    try:
        fd = sysbpf.map_create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.name)
    except OSError as exc:
        raise RedirectKernelError(f"cannot create map {spec.name}: {exc.strerror}") from exc
    try:
        sysbpf.obj_pin(fd, path)
    except OSError as exc:
        raise RedirectPinError(f"cannot pin map {spec.name} at {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


class PinnedMap:
    """One map opened from its bpffs pin, checked against the layout this agent was built for."""

    def __init__(self, spec: MapSpec, path: str, fd: int) -> None:
        self.spec = spec
        self.path = path
        self._fd = fd
        self._ncpu = possible_cpus() if spec.percpu else 1
        self._slot = (spec.value_size + 7) & ~7 if spec.percpu else spec.value_size

    @classmethod
    def open(cls, spec: MapSpec, pin_dir: str) -> PinnedMap:
        path = os.path.join(pin_dir, spec.name)
        try:
            fd = sysbpf.obj_get(path)
        except OSError as exc:
            raise RedirectPinError(f"cannot open pinned map {path}: {exc.strerror}") from exc
        pinned = cls(spec, path, fd)
        try:
            pinned.check_layout()
        except RedirectPinError:
            pinned.close()
            raise
        return pinned

    def check_layout(self) -> None:
        got = _shape_of(self._fd, self.path)
        if got != self.spec.shape:
            raise _mismatch(self.path, got, self.spec.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _value_buffer(self) -> ct.Array[ct.c_char]:
        return ct.create_string_buffer(self._slot * self._ncpu)

    def lookup_raw(self, key: ct._CData) -> bytes | None:
        buf = self._value_buffer()
        try:
            sysbpf.map_lookup(self._fd, key, buf)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise RedirectKernelError(f"lookup in {self.path} failed: {exc.strerror}") from exc
        return buf.raw

    def per_cpu(self, raw: bytes, leaf: type[ct.Structure] | type[ct.c_uint64]) -> list[ct._CData]:
        return [leaf.from_buffer_copy(raw, i * self._slot) for i in range(self._ncpu)]

    def update(self, key: ct._CData, value: ct._CData, flags: int = BPF_ANY) -> bool:
        """Write ``value`` (replicated to every CPU slot of a per-CPU map); False if BPF_NOEXIST found a key."""
        buf = self._value_buffer()
        raw = ct.string_at(ct.addressof(value), ct.sizeof(value))
        for i in range(self._ncpu):
            ct.memmove(ct.addressof(buf) + i * self._slot, raw, len(raw))
        try:
            sysbpf.map_update(self._fd, key, buf, flags)
        except OSError as exc:
            if exc.errno == errno.EEXIST and flags == BPF_NOEXIST:
                return False
            raise RedirectKernelError(f"update of {self.path} failed: {exc.strerror}") from exc
        return True

    def delete(self, key: ct._CData) -> bool:
        try:
            sysbpf.map_delete(self._fd, key)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise RedirectKernelError(f"delete from {self.path} failed: {exc.strerror}") from exc
        return True

    def keys(self, key_type: type[ct.Structure] | type[ct.c_uint32]) -> Iterator[ct._CData]:
        """Snapshot of the keys (collected first, so callers may delete while iterating)."""
        found: list[ct._CData] = []
        prev: ct._CData | None = None
        while True:
            nxt = key_type()
            try:
                sysbpf.map_next_key(self._fd, prev, nxt)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break
                raise RedirectKernelError(f"iterating {self.path} failed: {exc.strerror}") from exc
            found.append(nxt)
            prev = nxt
        return iter(found)


@dataclass
class RedirectMaps:
    """All maps of one instance, opened from its pin directory."""

    workloads: PinnedMap
    homes: PinnedMap
    ifaces: PinnedMap
    if_spoofed: PinnedMap
    bridge_ports: PinnedMap
    agent_conns: PinnedMap
    config: PinnedMap
    stats: PinnedMap

    @classmethod
    def open(cls, pin_dir: str) -> RedirectMaps:
        opened: list[PinnedMap] = []
        try:
            for spec in ALL_MAPS:
                opened.append(PinnedMap.open(spec, pin_dir))
        except Exception:
            for m in opened:
                m.close()
            raise
        return cls(*opened)

    def close(self) -> None:
        maps = (self.workloads, self.homes, self.ifaces, self.if_spoofed, self.bridge_ports, self.agent_conns)
        for m in (*maps, self.config, self.stats):
            m.close()

    # --- typed accessors -------------------------------------------------------------------------------------

    def read_config(self) -> ConfigEntry:
        raw = self.config.lookup_raw(ct.c_uint32(0))
        return ConfigEntry.from_buffer_copy(raw) if raw else ConfigEntry()

    def write_config(self, cfg: ConfigEntry) -> None:
        self.config.update(ct.c_uint32(0), cfg)

    def iface_entries(self) -> dict[int, IfaceEntry]:
        out: dict[int, IfaceEntry] = {}
        for key in self.ifaces.keys(ct.c_uint32):
            raw = self.ifaces.lookup_raw(key)
            if raw is not None:
                out[int(key.value)] = IfaceEntry.from_buffer_copy(raw)  # type: ignore[attr-defined]
        return out

    def set_iface(self, ifindex: int, entry: IfaceEntry) -> None:
        self.ifaces.update(ct.c_uint32(ifindex), entry)

    def delete_iface(self, ifindex: int) -> bool:
        """Forget an interface, its spoofing count and bridge included (ifindexes are reused by later interfaces)."""
        self.if_spoofed.delete(ct.c_uint32(ifindex))
        found = self.ifaces.delete(ct.c_uint32(ifindex))
        self.bridge_ports.delete(ct.c_uint32(ifindex))  # after the role: a port's flag never lacks its bridge
        return found

    def bridge_port_entries(self) -> dict[int, tuple[int, bytes]]:
        """Port ifindex -> (bridge ifindex, bridge MAC)."""
        out: dict[int, tuple[int, bytes]] = {}
        for key in self.bridge_ports.keys(ct.c_uint32):
            raw = self.bridge_ports.lookup_raw(key)
            if raw is not None:
                entry = BridgePort.from_buffer_copy(raw)
                out[int(key.value)] = (int(entry.bridge), bytes(entry.mac))  # type: ignore[attr-defined]
        return out

    def set_bridge_port(self, port: int, bridge: int, mac: bytes) -> None:
        if len(mac) != 6:
            raise RedirectKernelError(f"bridge {bridge} has no Ethernet address (got {mac.hex(':') or 'none'})")
        self.bridge_ports.update(ct.c_uint32(port), BridgePort(bridge, (ct.c_uint8 * 6)(*mac)))

    def delete_bridge_port(self, port: int) -> bool:
        return self.bridge_ports.delete(ct.c_uint32(port))

    def allow_agent_conn(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        """Let the SYN of the agent's own connection src -> dst (made from inside the pod) pass uncaptured."""
        self.agent_conns.update(pack_conn(src, dst), ct.c_uint8(1))

    def forget_agent_conn(self, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        return self.agent_conns.delete(pack_conn(src, dst))

    def clear_agent_conns(self) -> int:
        """Forget every entry (at start: connects in progress died with the previous agent); returns how many."""
        keys = list(self.agent_conns.keys(ConnKey))
        for key in keys:
            self.agent_conns.delete(key)
        return len(keys)

    def spoofed_by_iface(self) -> dict[int, int]:
        """ifindex -> TCP packets dropped there as sent from another workload's address (summed over CPUs)."""
        out: dict[int, int] = {}
        for key in self.if_spoofed.keys(ct.c_uint32):
            raw = self.if_spoofed.lookup_raw(key)
            if raw is not None:
                values: list[Any] = self.if_spoofed.per_cpu(raw, ct.c_uint64)
                out[int(key.value)] = sum(int(v.value) for v in values)  # type: ignore[attr-defined]
        return out

    def workload_ips(self) -> set[str]:
        return {unpack_addr(k) for k in self.workloads.keys(AmbitAddr)}  # type: ignore[arg-type]

    def add_workload(self, ip: str) -> bool:
        """Enroll with zeroed counters; an entry that already exists (adopted after a restart) keeps its counts."""
        return self.workloads.update(pack_addr(ip), WlCounters(), BPF_NOEXIST)

    def delete_workload(self, ip: str) -> bool:
        return self.workloads.delete(pack_addr(ip))

    def workload_homes(self) -> dict[str, int]:
        """Enrolled address -> ifindex of the pod interface allowed to send from it."""
        out: dict[str, int] = {}
        for key in self.homes.keys(AmbitAddr):
            raw = self.homes.lookup_raw(key)
            if raw is not None:
                out[unpack_addr(key)] = int.from_bytes(raw[:4], sys.byteorder)  # type: ignore[arg-type]
        return out

    def set_home(self, ip: str, ifindex: int) -> None:
        self.homes.update(pack_addr(ip), ct.c_uint32(ifindex))

    def delete_home(self, ip: str) -> bool:
        return self.homes.delete(pack_addr(ip))

    def workload_counters(self) -> dict[str, WlCounters]:
        out: dict[str, WlCounters] = {}
        for key in self.workloads.keys(AmbitAddr):
            raw = self.workloads.lookup_raw(key)
            if raw is None:
                continue
            total = WlCounters()
            for cpu in self.workloads.per_cpu(raw, WlCounters):
                for fname in ("packets", "bytes", "conns_out", "conns_in", "drops"):
                    setattr(total, fname, getattr(total, fname) + getattr(cpu, fname))
            out[unpack_addr(key)] = total  # type: ignore[arg-type]
        return out

    def stat_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for idx, name in enumerate(STAT_NAMES):
            raw = self.stats.lookup_raw(ct.c_uint32(idx))
            values: list[Any] = self.stats.per_cpu(raw, ct.c_uint64) if raw else []
            out[name] = sum(int(v.value) for v in values)
        return out
