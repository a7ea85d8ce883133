"""The Python mirrors of bpf/ambit_maps.h must match the C contract byte for byte (a mismatch would make the agent
read garbage from pinned maps), and address keys must pack the way the program builds them."""

from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

import pytest

from agent import redirect_maps as rm
from agent.redirect_errors import RedirectPinError

HEADER = (Path(__file__).resolve().parents[2] / "bpf" / "ambit_maps.h").read_text()


def _define(name: str) -> int:
    m = re.search(rf"^#define {name} (\S+)", HEADER, re.M)
    assert m, name
    return int(m.group(1), 0)


def _struct_fields(name: str) -> list[str]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", HEADER, re.S)
    assert body, name
    fields = []
    for line in body.group(1).splitlines():
        m = re.match(r"\s*u(?:8|16|32|64) (\w+)(?:\[\d+\])?;", line)
        if m:
            fields.append(m.group(1))
    return fields


def test_struct_layouts_match_the_header() -> None:
    assert [f[0] for f in rm.AmbitAddr._fields_] == _struct_fields("ambit_addr")
    assert [f[0] for f in rm.WlCounters._fields_] == _struct_fields("ambit_wl_counters")
    assert [f[0] for f in rm.IfaceEntry._fields_] == _struct_fields("ambit_iface")
    assert [f[0] for f in rm.ConfigEntry._fields_] == _struct_fields("ambit_config")
    assert [f[0] for f in rm.BridgePort._fields_] == _struct_fields("ambit_bridge_port")
    assert [f[0] for f in rm.ConnKey._fields_] == _struct_fields("ambit_conn_key")
    assert ct.sizeof(rm.BridgePort) == 12
    assert (ct.sizeof(rm.AmbitAddr), ct.sizeof(rm.WlCounters), ct.sizeof(rm.IfaceEntry)) == (20, 40, 8)
    assert ct.sizeof(rm.ConfigEntry) == 32


def test_constants_match_the_header() -> None:
    assert _define("AMBIT_LAYOUT_VERSION") == rm.LAYOUT_VERSION
    assert _define("AMBIT_IF_POD") == rm.IF_POD
    assert _define("AMBIT_IF_UPLINK") == rm.IF_UPLINK
    assert (_define("AMBIT_IF_BRIDGE"), _define("AMBIT_IF_BRIDGE_PORT")) == (rm.IF_BRIDGE, rm.IF_BRIDGE_PORT)
    assert _define("AMBIT_LOADER_OWNS_QDISC") == rm.LOADER_OWNS_QDISC
    assert (_define("AMBIT_AF_INET"), _define("AMBIT_AF_INET6")) == (rm.AF_INET, rm.AF_INET6)
    stats = sorted(
        (int(v), n.lower()) for n, v in re.findall(r"^#define AMBIT_STAT_(\w+) (\d+)", HEADER, re.M) if n != "MAX"
    )
    assert tuple(name for _, name in stats) == rm.STAT_NAMES
    assert _define("AMBIT_STAT_MAX") == len(rm.STAT_NAMES) == rm.STATS.max_entries


def test_map_declarations_match_specs() -> None:
    decls = re.findall(r'BPF_TABLE_PINNED\("(\w+)",\s*([^,]+),\s*([^,]+),\s*(\w+),\s*(\w+),', HEADER)
    assert {d[3] for d in decls} == {s.name for s in rm.ALL_MAPS}
    types = {"hash": 1, "array": 2, "percpu_hash": 5, "percpu_array": 6, "lru_hash": 9}
    sizes = {
        "u8": 1,
        "u32": 4,
        "u64": 8,
        "struct ambit_conn_key": ct.sizeof(rm.ConnKey),
        "struct ambit_addr": ct.sizeof(rm.AmbitAddr),
        "struct ambit_wl_counters": ct.sizeof(rm.WlCounters),
        "struct ambit_iface": ct.sizeof(rm.IfaceEntry),
        "struct ambit_config": ct.sizeof(rm.ConfigEntry),
        "struct ambit_bridge_port": ct.sizeof(rm.BridgePort),
    }
    for kind, key, leaf, name, max_entries in decls:
        spec = next(s for s in rm.ALL_MAPS if s.name == name)
        assert types[kind] == spec.map_type, name
        assert (sizes[key.strip()], sizes[leaf.strip()]) == (spec.key_size, spec.value_size), name
        limit = _define(max_entries) if not max_entries.isdigit() else int(max_entries)
        assert limit == spec.max_entries, name


def test_ipv4_key_is_family_plus_network_order_address_zero_padded() -> None:
    key = rm.pack_addr("10.77.1.10")
    assert key.family == rm.AF_INET
    assert bytes(key.addr) == bytes([10, 77, 1, 10]) + bytes(12)
    assert bytes(key)[:4] == bytes([rm.AF_INET, 0, 0, 0])
    assert rm.unpack_addr(key) == "10.77.1.10"


def test_ipv6_key_round_trips() -> None:
    key = rm.pack_addr("fd00::5")
    assert key.family == rm.AF_INET6
    assert rm.unpack_addr(key) == "fd00::5"


def test_bad_address_text_is_rejected() -> None:
    with pytest.raises(ValueError):
        rm.pack_addr("10.77.1")


def test_unknown_family_in_a_key_is_an_error() -> None:
    key = rm.AmbitAddr()
    key.family = 7
    with pytest.raises(ValueError, match="family 7"):
        rm.unpack_addr(key)


# What an agent of layout 1 pinned: no ambit_wl_home, and ambit_stats one entry shorter (no drop_spoofed).
# Layout 2 added ambit_wl_home and ambit_if_spoofed, layout 3 ambit_bridge_ports, layout 4 ambit_agent_conns (and
# pass_agent in ambit_stats).
LAYOUT_1 = {
    "ambit_workloads": rm.WORKLOADS.shape,
    "ambit_ifaces": rm.IFACES.shape,
    "ambit_config": rm.CONFIG.shape,
    "ambit_stats": (rm.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 8),
}


def test_layout_1_pins_migrate_by_adding_homes_and_replacing_only_the_counters() -> None:
    plan = rm.plan_migration("/sys/fs/bpf/ambit/n1", 1, LAYOUT_1)
    assert plan.create == (rm.HOMES, rm.IF_SPOOFED, rm.BRIDGE_PORTS, rm.AGENT_CONNS)
    assert plan.replace == (rm.STATS,)
    assert plan.describe() == [
        "created ambit_wl_home",
        "created ambit_if_spoofed",
        "created ambit_bridge_ports",
        "created ambit_agent_conns",
        "replaced ambit_stats, counts reset",
    ]


def test_layout_2_pins_migrate_by_adding_the_later_maps() -> None:
    layout_2 = {spec.name: spec.shape for spec in rm.ALL_MAPS if spec not in (rm.BRIDGE_PORTS, rm.AGENT_CONNS)}
    layout_2["ambit_stats"] = (rm.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 9)
    plan = rm.plan_migration("/p", 2, layout_2)
    assert plan == rm.PinMigration(create=(rm.BRIDGE_PORTS, rm.AGENT_CONNS), replace=(rm.STATS,))


def test_layout_3_pins_migrate_by_adding_the_agent_connections_and_a_counter() -> None:
    layout_3 = {spec.name: spec.shape for spec in rm.ALL_MAPS if spec is not rm.AGENT_CONNS}
    layout_3["ambit_stats"] = (rm.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 9)
    plan = rm.plan_migration("/p", 3, layout_3)
    assert plan == rm.PinMigration(create=(rm.AGENT_CONNS,), replace=(rm.STATS,))
    assert rm.STATS.shape[3] == 10 and rm.STAT_NAMES[9] == "pass_agent"


def test_a_connection_key_packs_both_families_in_network_order() -> None:
    key = rm.pack_conn(("10.1.2.3", 40000), ("192.0.2.7", 443))
    assert key.family == rm.AF_INET
    assert bytes(key.saddr) == bytes([10, 1, 2, 3]) + bytes(12)
    assert bytes(key.daddr) == bytes([192, 0, 2, 7]) + bytes(12)
    assert bytes(key)[36:40] == (40000).to_bytes(2, "big") + (443).to_bytes(2, "big")
    assert ct.sizeof(rm.ConnKey) == 40
    v6 = rm.pack_conn(("fd00::1", 1), ("2001:db8::2", 2))
    assert v6.family == rm.AF_INET6 and bytes(v6.daddr) == bytes.fromhex("20010db8" + "0" * 23 + "2")
    with pytest.raises(ValueError, match="different address families"):
        rm.pack_conn(("10.0.0.1", 1), ("fd00::1", 2))


def test_current_pins_need_no_migration() -> None:
    current = {spec.name: spec.shape for spec in rm.ALL_MAPS}
    assert rm.plan_migration("/p", rm.LAYOUT_VERSION, current) == rm.PinMigration()


def test_pins_of_a_newer_layout_are_refused_even_when_every_shape_fits() -> None:
    current = {spec.name: spec.shape for spec in rm.ALL_MAPS}
    with pytest.raises(RedirectPinError, match=rf"/p have layout {rm.LAYOUT_VERSION + 1}, newer than"):
        rm.plan_migration("/p", rm.LAYOUT_VERSION + 1, current)


def test_a_changed_state_map_is_refused_not_replaced() -> None:
    # Enrollment is state the kernel acts on: replacing it would silently release every pod.
    changed = dict(LAYOUT_1, ambit_workloads=(rm.BPF_MAP_TYPE_PERCPU_HASH, 20, 32, 16384))
    with pytest.raises(RedirectPinError, match=r"/p/ambit_workloads has .* \(5, 20, 32, 16384\)"):
        rm.plan_migration("/p", 1, changed)


def test_only_counter_maps_may_be_replaced_by_a_migration() -> None:
    # Marking a state map counters-only would let a migration wipe enrollment or homes without a word.
    assert {spec.name for spec in rm.ALL_MAPS if spec.counters_only} == {"ambit_stats", "ambit_if_spoofed"}
