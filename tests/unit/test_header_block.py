"""agent.header_block against hpack itself: same bytes out, same headers in, same tables after, same errors."""

from __future__ import annotations

import contextlib

import pytest
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import table_entry_size
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.header_block import BlockDecoder, BlockEncoder, Header, HeaderListTooLarge

# Static-table names and values (exact and name-only matches), and names only the dynamic table can know.
NAMES = [":method", ":authority", ":status", "content-type", "accept-encoding", "forwarded", "baggage", "x-a"]
VALUES = ["CONNECT", "GET", "200", "404", "gzip, deflate", "10.0.0.2:8080", "k=v", "", "x" * 130]
headers_st = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES), st.booleans()), max_size=8)
# A block, or a table size change (the peer's SETTINGS) before the next one.
steps_st = st.lists(st.one_of(headers_st, st.sampled_from([0, 64, 256, 4096])), min_size=1, max_size=25)


def _strings(raw: object) -> list[tuple[str, str]]:
    """hpack's raw decode result as BlockDecoder gives it."""
    return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]  # type: ignore[attr-defined]


def _table(coder: Encoder | Decoder) -> list[tuple[bytes, bytes]]:
    return list(coder.header_table.dynamic_entries)


class _NoHpack(Encoder):
    def encode(self, headers: object, huffman: bool = True) -> bytes:
        raise AssertionError("the direct path should have coded this block")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_st)
def test_encoder_writes_what_hpack_writes(steps: list[list[Header] | int]) -> None:
    ours, ref = BlockEncoder(), Encoder()
    for step in steps:
        if isinstance(step, int):
            ours.set_table_size(step)
            if step != ref.header_table_size:
                ref.header_table_size = step
            continue
        assert ours.encode(step) == ref.encode(step, huffman=False)
        assert _table(ours.hpack) == _table(ref)


def test_encoder_codes_repeat_connect_blocks_itself() -> None:
    """After the first stream only indexed fields and never-indexed literals remain: hpack is not called."""
    enc = BlockEncoder()
    first: list[Header] = [
        (":method", "CONNECT", False),
        (":authority", "10.0.0.2:8080", False),
        ("baggage", "k=v", False),
    ]
    per_stream: list[Header] = [("forwarded", 'for="10.0.0.1:4000"', True), ("traceparent", "00-ab-cd-00", True)]
    ref = Encoder()
    expected = [ref.encode(first + per_stream, huffman=False) for _ in range(2)]
    assert enc.encode(first + per_stream) == expected[0]
    enc.hpack.__class__ = _NoHpack
    assert enc.encode(first + per_stream) == expected[1]
    # :method CONNECT, :authority, baggage by index; forwarded and traceparent never indexed, literal names
    assert expected[1][:3] == bytes([0x80 | 64, 0x80 | 63, 0x80 | 62]) and expected[1][3] == 0x10


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_st, huffman=st.booleans())
def test_decoder_reads_what_hpack_reads(steps: list[list[Header] | int], huffman: bool) -> None:
    enc = BlockEncoder()
    ours = BlockDecoder(max_header_list_size=65536, max_table_size=4096)
    ref = Decoder(max_header_list_size=65536)
    for step in steps:
        if isinstance(step, int):
            enc.set_table_size(step)
            continue
        block = enc.hpack.encode(step, huffman=huffman)
        expected = _strings(ref.decode(block, raw=True))
        assert ours.decode(block) == expected == [(n, v) for n, v, _ in step]
        assert _table(ours.hpack) == _table(ref)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=headers_st, garbage=st.binary(max_size=40), cut=st.integers(min_value=0, max_value=60))
def test_decoder_fails_and_succeeds_like_hpack(prefix: list[Header], garbage: bytes, cut: int) -> None:
    """Truncated, corrupted and random blocks: the same headers or the same error, and the same table after.

    hpack is given our hard limit; a list it decodes that is above our advertised limit is HeaderListTooLarge."""
    primer = Encoder().encode(prefix, huffman=False)  # fills both tables identically first
    ours = BlockDecoder(max_header_list_size=300, max_table_size=4096)
    ref = Decoder(max_header_list_size=ours.hard_header_list_size)
    for dec in (ours.hpack, ref):
        with contextlib.suppress(HPACKError):
            dec.decode(primer, raw=True)
    block = primer[:cut] + garbage
    try:
        raw = ref.decode(block, raw=True)
        big = sum(table_entry_size(k, v) for k, v in raw) > 300
        expected: object = HeaderListTooLarge if big else _strings(raw)
    except HPACKError as e:
        expected = type(e)
    try:
        got: object = ours.decode(block)
    except (HPACKError, HeaderListTooLarge) as e:
        got = type(e)
    assert got == expected
    assert _table(ours.hpack) == _table(ref)


def test_repeated_table_size_keeps_the_peer_in_sync() -> None:
    """The same SETTINGS_HEADER_TABLE_SIZE twice before a block: the size update must still go out."""
    enc, dec = BlockEncoder(), BlockDecoder(max_header_list_size=65536, max_table_size=4096)
    enc.set_table_size(100)
    enc.set_table_size(100)
    for _ in range(2):
        block = enc.encode([(":authority", "10.0.0.2:8080", False), ("x-a", "1", False)])
        assert dec.decode(block) == [(":authority", "10.0.0.2:8080"), ("x-a", "1")]
    assert dec.hpack.header_table.maxsize == 100
    assert _table(dec.hpack) == _table(enc.hpack)


def test_decoder_enforces_the_header_list_limits() -> None:
    """3 x 135 = 405 bytes: within 500; above 300 but within its hard limit (600) a HeaderListTooLarge; above
    the hard limit of 150 (300) hpack's own error, mid-block."""
    block = Encoder().encode([("x-a", "v" * 100, True)] * 3, huffman=False)  # never indexed: the direct path
    assert BlockDecoder(max_header_list_size=500, max_table_size=4096).decode(block)
    with pytest.raises(HeaderListTooLarge, match="405 bytes exceeds 300") as err:
        BlockDecoder(max_header_list_size=300, max_table_size=4096).decode(block)
    assert (err.value.size, err.value.limit) == (405, 300)
    with pytest.raises(OversizedHeaderListError, match="larger than"):
        BlockDecoder(max_header_list_size=150, max_table_size=4096).decode(block)


@pytest.mark.parametrize("huffman", [False, True])
def test_an_oversized_list_still_updates_the_tables(huffman: bool) -> None:
    """A refused list must leave the dynamic table as the peer's encoder left it: the next block, made of
    references to entries the refused one inserted, decodes to what was sent."""
    enc = Encoder()
    ours = BlockDecoder(max_header_list_size=1024, max_table_size=4096)
    big = [(f"x-{i}", "v" * 200) for i in range(8)]  # 8 x 237 bytes: above 1024, within 2048; all inserted
    with pytest.raises(HeaderListTooLarge):
        ours.decode(enc.encode([(":authority", "10.0.0.2:8080"), *big], huffman=huffman))
    assert _table(ours.hpack) == _table(enc)
    later = [(":authority", "10.0.0.2:8080"), ("x-7", "v" * 200), ("x-3", "v" * 200)]
    block = enc.encode(later, huffman=huffman)
    assert len(block) == 3  # three indexed fields: wrong if our table had missed the insertions
    assert ours.decode(block) == later
