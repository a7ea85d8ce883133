"""The DNAT capture table's text and the node conditions it cannot cover, without a kernel (the table itself is
exercised against nftables in tests/integration/test_capture_dnat*.py)."""

from __future__ import annotations

from agent.capture_dnat import IPVS_DEVICE, ruleset, table_name, uncovered_rewrites


def test_kube_proxy_in_ipvs_mode_is_named_as_uncovered() -> None:
    why = uncovered_rewrites(["lo", "eth0", IPVS_DEVICE, "cni0"])
    assert why is not None and IPVS_DEVICE in why and "IPVS" in why
    assert uncovered_rewrites(["lo", "eth0", "cni0", "vxlan.calico"]) is None


def test_the_table_splits_addresses_by_family_and_keeps_other_mark_bits() -> None:
    text = ruleset(table_name("node-a"), ["10.0.0.2", "fd00::2", "10.0.0.1"], port=15006, mark=0x200, mark_mask=0xF00)
    assert "table inet ambit_node-a {" in text
    assert "set enrolled4 { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }" in text
    assert "set enrolled6 { type ipv6_addr; elements = { fd00::2 }; }" in text
    assert "tproxy ip to :15006" in text and "tproxy ip6 to :15006" in text
    # the mark is set inside its mask only: kube-proxy's 0x4000 (masquerade) and other bits survive
    assert "meta mark set meta mark & 0xfffff0ff | 0x200" in text
    assert text.index(f"delete table inet {table_name('node-a')}") < text.index("set enrolled4"), "replaced whole"
