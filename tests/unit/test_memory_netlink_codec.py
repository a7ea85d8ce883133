"""The agent's rtnetlink attribute codec (agent/redirect_netlink.py): what it encodes it reads back, nested options
included, and truncated or garbage replies end the scan instead of raising or reading past the message."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from agent.redirect_netlink import (
    TCA_BPF_FD,
    TCA_BPF_NAME,
    TCA_KIND,
    TCA_OPTIONS,
    attributes,
    get_ip,
    get_str,
    get_u32,
    nla,
    nla_str,
    nla_u32,
)


def test_attributes_round_trip_with_nesting_and_padding() -> None:
    options = nla_u32(TCA_BPF_FD, 7) + nla_str(TCA_BPF_NAME, "ambit:node1")
    msg = (
        nla_str(TCA_KIND, "bpf")
        + nla(TCA_OPTIONS | 0x8000, options)
        + nla(9, socket.inet_pton(socket.AF_INET6, "fd00::1"))
    )
    attrs = attributes(msg)
    assert get_str(attrs, TCA_KIND) == "bpf"
    nested = attributes(attrs[TCA_OPTIONS])  # the NLA_F_NESTED flag is stripped from the type
    assert get_u32(nested, TCA_BPF_FD) == 7
    assert get_str(nested, TCA_BPF_NAME) == "ambit:node1"
    assert get_ip(attrs, 9) == "fd00::1"
    assert len(nla_str(TCA_KIND, "bpf")) % 4 == 0


def test_missing_or_short_attributes_read_as_none() -> None:
    attrs = attributes(nla(4, b"\x01\x02"))
    assert get_u32(attrs, 4) is None  # two bytes are no u32
    assert get_ip(attrs, 4) is None
    assert get_str(attrs, 5) is None


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=64))
def test_garbage_never_raises_and_stays_inside_the_message(data: bytes, offset: int) -> None:
    for value in attributes(data, offset).values():
        assert len(value) <= len(data)


def test_a_truncated_attribute_ends_the_scan() -> None:
    good = nla_u32(1, 5)
    attrs = attributes(good + nla_u32(2, 6)[:6])
    assert get_u32(attrs, 1) == 5 and 2 not in attrs
