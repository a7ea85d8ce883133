"""The DNAT capture table's text and the node conditions it cannot cover, without a kernel (the table itself is
exercised against nftables in tests/integration/test_capture_dnat*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.capture_dnat import IPVS_DEVICE, DnatCapture, DnatCaptureError, ruleset, table_name, uncovered_rewrites


def test_kube_proxy_in_ipvs_mode_is_named_as_uncovered() -> None:
    why = uncovered_rewrites(["lo", "eth0", IPVS_DEVICE, "cni0"])
    assert why is not None and IPVS_DEVICE in why and "IPVS" in why
    assert uncovered_rewrites(["lo", "eth0", "cni0", "vxlan.calico"]) is None


def test_the_table_splits_addresses_by_family_and_keeps_other_mark_bits() -> None:
    text = ruleset(
        table_name("node-a"),
        ["10.0.0.2", "fd00::2", "10.0.0.1"],
        port=15006,
        hbone_port=15008,
        mark=0x200,
        mark_mask=0xF00,
    )
    assert "table inet ambit_node-a {" in text
    assert "set enrolled4 { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }" in text
    assert "set enrolled6 { type ipv6_addr; elements = { fd00::2 }; }" in text
    assert "tproxy ip to :15006" in text and "tproxy ip6 to :15006" in text
    # the mark is set inside its mask only: kube-proxy's 0x4000 (masquerade) and other bits survive
    assert "meta mark set meta mark & 0xfffff0ff | 0x200" in text
    assert text.index(f"delete table inet {table_name('node-a')}") < text.index("set enrolled4"), "replaced whole"


def _rules(text: str, family: str) -> list[str]:
    """The SYN-taking rules for ``family``'s enrolled set, in order."""
    field = "@enrolled4" if family == "ip" else "@enrolled6"
    return [line.strip() for line in text.splitlines() if f"ct status dnat {family} daddr {field}" in line]


def test_a_dnated_connection_to_the_hbone_port_goes_to_the_hbone_listener() -> None:
    text = ruleset(table_name("n"), ["10.0.0.1", "fd00::1"], port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00)
    for family in ("ip", "ip6"):
        hbone, plain, last = _rules(text, family)
        assert f"tcp dport 15008 tproxy {family} to :15008" in hbone
        # the plaintext rule must not take the HBONE port: with the HBONE listener missing, its SYN falls through
        # to the last rule instead of reaching the plaintext listener
        assert f"tcp dport != 15008 tproxy {family} to :15006" in plain
        assert last.endswith("counter drop")


def test_fail_open_lets_a_syn_with_no_listener_pass_counted_instead_of_dropping_it() -> None:
    closed = ruleset(table_name("n"), ["10.0.0.1"], port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00)
    opened = ruleset(
        table_name("n"), ["10.0.0.1"], port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00, fail_open=True
    )
    assert _rules(closed, "ip")[-1].endswith("counter drop") and "counter drop" not in opened
    assert _rules(opened, "ip")[-1].endswith("counter accept")
    assert _rules(opened, "ip")[:2] == _rules(closed, "ip")[:2], "capture itself is the same"


def _fake_nft(tmp_path: Path) -> Path:
    """An nft stand-in: `-f -` keeps the script (and counts the write), `list` shows the last one kept."""
    nft = tmp_path / "nft"
    nft.write_text(
        "#!/bin/sh\n"
        f'd="{tmp_path}"\n'
        'if [ "$1" = "-f" ]; then cat > "$d/table"; echo w >> "$d/writes"; exit 0; fi\n'
        '[ -f "$d/table" ] && exec cat "$d/table"\n'
        "exit 1\n"
    )
    nft.chmod(0o755)
    return nft


def _writes(tmp_path: Path) -> int:
    return len((tmp_path / "writes").read_text().split()) if (tmp_path / "writes").exists() else 0


def test_a_change_of_fail_open_rewrites_the_table_and_nothing_else_does(tmp_path: Path) -> None:
    capture = DnatCapture("n", port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00, nft=str(_fake_nft(tmp_path)))
    capture.sync({"10.0.0.1"})
    capture.sync({"10.0.0.1"})
    assert _writes(tmp_path) == 1 and "counter drop" in (tmp_path / "table").read_text()
    capture.fail_open = True
    capture.sync({"10.0.0.1"})
    assert _writes(tmp_path) == 2 and "counter accept" in (tmp_path / "table").read_text()
    capture.sync({"10.0.0.1"})
    assert _writes(tmp_path) == 2


def test_a_missing_nft_is_an_error_the_next_sync_retries(tmp_path: Path) -> None:
    capture = DnatCapture("n", port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00, nft=str(tmp_path / "nft"))
    with pytest.raises(DnatCaptureError, match="cannot run"):
        capture.sync({"10.0.0.1"})
    _fake_nft(tmp_path)  # installed meanwhile
    capture.sync({"10.0.0.1"})
    assert _writes(tmp_path) == 1
