"""Capture configuration: defaults fit the lab, bad values name the field."""

from __future__ import annotations

from typing import Any

import pytest

from agent.redirect import RedirectConfig, RedirectConfigError


def test_defaults() -> None:
    cfg = RedirectConfig()
    assert (cfg.outbound_port, cfg.inbound_port, cfg.hbone_port) == (15001, 15006, 15008)
    assert (cfg.mark, cfg.mark_mask, cfg.route_table) == (0x200, 0xF00, 100)
    assert cfg.fail_open is False and cfg.disable_early_demux is True
    assert cfg.pin_dir == "/sys/fs/bpf/ambit/default"
    assert cfg.filter_name == "ambit:default"
    assert cfg.source.endswith("bpf/redirect.bpf.c")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("instance", ""),
        ("instance", "../etc"),
        ("instance", "a" * 64),
        ("outbound_port", 0),
        ("hbone_port", 70000),
        ("inbound_port", 15001),  # collides with outbound_port
        ("mark", 0x1200),  # outside mark_mask
        ("mark", 0),
        ("tc_priority", 0),
        ("tc_handle", 0),
        ("route_table", 254),
        ("rule_priority", 0),
        ("uplinks", ("a-very-long-interface-name",)),
        ("pin_root", "relative/dir"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(RedirectConfigError) as info:
        RedirectConfig(**{field: value})
    assert field.split("_")[0] in str(info.value)
