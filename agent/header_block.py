"""HPACK header blocks for HBONE: hpack's header tables and coder, with a direct path for the representations
that leave the tables as they are.

Why: hpack codes a five-header CONNECT block in ~24 us and decodes it in ~31 us in a hot loop, ~40 and ~60 us on
a connection's cold path; both sit on the new-connection critical path (encode on the client agent, decode on the
server agent) and were about a tenth of an agent's CPU per connection. Nearly all of it is per-header overhead
(logging calls, type checks, small allocations), not coding. After the first stream of a pooled connection every
header we send is either an exact table match (indexed) or a never-indexed literal (the per-stream values), and
neither representation changes a table. Those blocks are coded here, against hpack's own tables; every block that
needs a table change (a new entry, a size update), Huffman coding, is above the header list limit or is malformed
goes to hpack, untouched, which then also raises the errors. The direct path changes no state before it commits,
so handing over is always exact: output bytes, decoded headers and table contents are those hpack gives
(differential tests in tests/unit/test_header_block.py).
"""

from __future__ import annotations

from hpack import Decoder, Encoder
from hpack.exceptions import InvalidTableIndex
from hpack.table import HeaderTable, table_entry_size

Header = tuple[str, str, bool]
"""(name, value, never_indexed) as sent; never-indexed values are the ones that differ on every stream."""

_STATIC = HeaderTable.STATIC_TABLE_MAPPING  # name -> (first index of the name, {value: index})
_FIRST_DYNAMIC = HeaderTable.STATIC_TABLE_LENGTH + 1
_MAX_CONTINUATION = 3  # octets after an integer's prefix the direct path reads (2^21: beyond any block of ours)
# The hard header list limit is this many times the advertised SETTINGS_MAX_HEADER_LIST_SIZE (see BlockDecoder).
HARD_LIMIT_FACTOR = 2


class HeaderListTooLarge(Exception):
    """The block was decoded in full (the tables are in sync with the peer's) but its header list is above the
    advertised limit: a stream error, the connection carries on."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"header list of {size} bytes exceeds {limit}")
        self.size = size
        self.limit = limit


class _Unusual(Exception):
    """The block needs hpack: a table change, Huffman coding, or something malformed."""


class BlockEncoder:
    """Encodes header lists (non-Huffman) for one connection's HPACK context."""

    def __init__(self) -> None:
        self.hpack = Encoder()

    def set_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE (hpack emits the size update with the next block).

        Only a change is passed on: hpack clears its "resized" flag when told the size it already has, even with
        an update still queued, and would then never send that update (the peer's table would stay bigger)."""
        if size != self.hpack.header_table_size:
            self.hpack.header_table_size = size

    def encode(self, headers: list[Header]) -> bytes:
        block = self._direct(headers)
        return block if block is not None else self.hpack.encode(headers, huffman=False)

    def _direct(self, headers: list[Header]) -> bytes | None:
        """hpack's encoding when no header needs a new table entry, else None (nothing changed)."""
        table = self.hpack.header_table
        if table.resized:
            return None
        dynamic = table.dynamic_entries
        out = bytearray()
        for name, value, never in headers:
            n = name.encode()
            v = value.encode()
            index = name_index = 0
            static = _STATIC.get(n)
            if static is not None:
                name_index = static[0]
                index = static[1].get(v, 0)
            if not index:
                # hpack's search order: the newest dynamic entry wins; a static name beats a dynamic one
                for i, (dn, dv) in enumerate(dynamic, _FIRST_DYNAMIC):
                    if dn == n:
                        if dv == v:
                            index = i
                            break
                        if not name_index:
                            name_index = i
            if index:
                _put_int(out, index, 7, 0x80)
            elif never:
                if name_index:
                    _put_int(out, name_index, 4, 0x10)
                else:
                    out.append(0x10)
                    _put_int(out, len(n), 7, 0)
                    out += n
                _put_int(out, len(v), 7, 0)
                out += v
            else:
                return None  # hpack adds it to the table
        return bytes(out)


class BlockDecoder:
    """Decodes header blocks for one connection's HPACK context into (name, value) strings (latin-1, as
    received: HBONE's headers are ASCII and nothing downstream may fail on a peer's odd bytes).

    Two limits, both in RFC 7541 4.1 bytes (name + value + 32 per field). Up to ``max_header_list_size`` (what
    we advertise) a list is returned. Above it, up to ``hard_header_list_size`` (HARD_LIMIT_FACTOR times that),
    the block is still decoded to its end, so that every dynamic-table insertion in it happens and later blocks
    decode right, and then refused with HeaderListTooLarge: ztunnel's h2 answers such a request 431 (and resets
    the stream of such a response), and the connection carries on. Above the hard size hpack stops mid-block; the
    table is then out of step with the peer's and only a connection error is left.

    Why a hard size at all, when h2 and Envoy reset the stream however big the list: they decode a block as its
    frames arrive and drop fields past the limit, we decode whole blocks in Python. The hard size bounds what a
    peer can make us hold (a one-octet index can stand for a 4 KiB table entry: without it a small block could
    inflate a thousandfold) and, applied by the caller to the encoded block it buffers, the CPU one block costs
    (hpack's Huffman decoding takes ~0.45 us an octet: ~60 ms for 128 KiB). Twice the limit still answers 431 to
    lists somewhat over it, what a misconfigured peer sends; nothing an HBONE peer means sends more.
    """

    def __init__(self, *, max_header_list_size: int, max_table_size: int) -> None:
        self.max_header_list_size = max_header_list_size
        self.hard_header_list_size = HARD_LIMIT_FACTOR * max_header_list_size
        self.hpack = Decoder(max_header_list_size=self.hard_header_list_size)
        self.hpack.max_allowed_table_size = max_table_size

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """Raises HeaderListTooLarge (tables updated) above the advertised limit; hpack's HPACKError subclasses
        for a block it refuses, OversizedHeaderListError above the hard size (tables left mid-block)."""
        try:
            return self._direct(block)
        except (_Unusual, IndexError, InvalidTableIndex):
            pass
        raw = self.hpack.decode(block, raw=True)
        size = sum(table_entry_size(k, v) for k, v in raw)
        if size > self.max_header_list_size:
            raise HeaderListTooLarge(size, self.max_header_list_size)
        return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]

    def _direct(self, block: bytes) -> list[tuple[str, str]]:
        """Indexed fields and literals without indexing only; raises (having changed nothing) otherwise."""
        dec = self.hpack
        table = dec.header_table
        if table.maxsize > dec.max_allowed_table_size:
            raise _Unusual
        get = table.get_by_index
        limit = self.max_header_list_size  # above it hpack decodes the rest, which may change the tables
        headers: list[tuple[str, str]] = []
        size = pos = 0
        end = len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:
                index, pos = _get_int(block, pos, 7)
                if not index:
                    raise _Unusual
                name, value = get(index)
            elif first & 0x60:  # literal with incremental indexing, or a table size update
                raise _Unusual
            else:  # literal without indexing / never indexed
                index, pos = _get_int(block, pos, 4)
                if index:
                    name = get(index)[0]
                else:
                    name, pos = _get_string(block, pos)
                value, pos = _get_string(block, pos)
            size += len(name) + len(value) + 32
            if size > limit:
                raise _Unusual
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        return headers


def _put_int(out: bytearray, value: int, prefix_bits: int, flags: int) -> None:
    """RFC 7541 5.1 integer, ``flags`` in the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        out.append(flags | value)
        return
    out.append(flags | limit)
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """(integer, position after it); IndexError when the block ends inside it."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    for shift in range(0, 7 * _MAX_CONTINUATION, 7):
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if byte < 128:
            return value, pos
    raise _Unusual


def _get_string(block: bytes, pos: int) -> tuple[bytes, int]:
    if block[pos] & 0x80:  # Huffman-coded
        raise _Unusual
    length, pos = _get_int(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise _Unusual
    return block[pos:end], end
