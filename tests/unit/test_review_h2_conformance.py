"""Adversarial conformance review of the sans-IO HBONE HTTP/2 core against RFC 9113 / RFC 7541 / RFC 9110 CONNECT,
in the spirit of h2spec (summerwind/h2spec: its generic, http2 and hpack groups) and of what hyperium/h2 (ztunnel)
does. Each case feeds raw frame bytes to one side of a connected pair and checks the exact answer on the wire: a
connection error (GOAWAY with its code, nothing parsed after), a stream error (RST_STREAM with its code, the other
streams still served), or acceptance. Only cases test_hbone_core.py / test_hbone_headers.py do not already cover.

Deliberate differences, each pinned by a case here:

* Frames on a closed stream are discarded (RFC 9113 5.1: "An endpoint can perform this minimal processing for all
  streams that are in the closed state"); h2spec (RFC 7540-era) wants STREAM_CLOSED, h2 answers DATA on a stream
  it forgot with RST_STREAM(STREAM_CLOSED). Discarding sends nothing a peer could make us repeat.
* PRIORITY of a bad length is the RFC's stream error (FRAME_SIZE_ERROR, 9113 6.3), where h2 closes the connection
  (PROTOCOL_ERROR); on an idle stream, which no RST_STREAM may name (6.4), it is the connection's error.
* A malformed CONNECT is answered 400 and then reset with PROTOCOL_ERROR (8.1.1 allows the answer; h2 only
  resets). An oversized one gets 431 and RST_STREAM(NO_ERROR) (test_hbone_headers; h2 resets with PROTOCOL_ERROR).
* content-length on a CONNECT is passed through unchecked: a CONNECT has no content (RFC 9110 9.3.6) and its DATA
  are tunnel bytes (h2 would count them against it). A Host header beside :authority is not compared (9113 8.3.1
  SHOULD; nothing in HBONE reads Host).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hpack import Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import hbone
from agent.hbone import (
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    HboneConnection,
    HboneSettings,
    PingAcked,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from tests.unit.test_hbone_core import HDR, exchange, frame, open_tunnel, pair, settings_frame

END_HEADERS = hbone.FLAG_END_HEADERS
END_STREAM = hbone.FLAG_END_STREAM
PADDED = hbone.FLAG_PADDED
PRIORITY_FLAG = hbone.FLAG_PRIORITY
U32 = struct.Struct(">L")
CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.9:80")]


def block(headers: list[tuple[str, str]] | list[tuple[bytes, bytes]], huffman: bool = False) -> bytes:
    """A header block that leaves every HPACK table as it is (never-indexed literals and static references), so
    it decodes the same whatever the receiver's dynamic table holds."""
    return Encoder().encode([(n, v, True) for n, v in headers], huffman=huffman)


def wire_frames(conn: HboneConnection) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of everything ``conn`` queued."""
    wire = b"".join(bytes(x) for x in conn.data_to_send())
    out = []
    pos = 0
    while pos < len(wire):
        hi, lo, ftype, flags, sid = HDR.unpack_from(wire, pos)
        n = (hi << 16) | lo
        out.append((ftype, flags, sid, wire[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


@dataclass
class Ctx:
    """A connected client/server pair with two answered tunnels, ``sid`` (the one cases poke) and ``other``."""

    client: HboneConnection
    server: HboneConnection
    sid: int
    other: int
    extra: dict[str, int] = field(default_factory=dict)


def make_ctx(setup: str, role: str) -> Ctx:
    client, server = pair()
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    ctx = Ctx(client, server, sid, other)
    if setup == "half_closed_remote":  # the peer ended its side of ``sid``; ours is open
        if role == "server":
            client.send_data(sid, b"bye", end_stream=True)
        else:
            server.send_data(sid, b"bye", end_stream=True)
        exchange(client, server)
    elif setup == "closed_by_us":  # the receiver reset ``sid``; the peer's frames sent before that still arrive
        receiver = server if role == "server" else client
        receiver.reset_stream(sid, ErrorCode.CANCEL)
        receiver.data_to_send()
    elif setup == "closed":  # both sides ended ``sid`` normally
        client.send_data(sid, b"", end_stream=True)
        server.send_data(sid, b"", end_stream=True)
        exchange(client, server)
        assert not server.stream_is_open(sid) and not client.stream_is_open(sid)
    client.data_to_send()
    server.data_to_send()
    return ctx


Wire = Callable[[Ctx], bytes]


@dataclass(frozen=True)
class Case:
    """``expect``: ("conn", code) a connection error; ("stream", code) RST_STREAM on the stream ``on`` names, the
    connection alive; ("400", code) a request answered 400 then reset with ``code``; ("ok",) accepted, nothing
    sent but what ``replies`` lists (frame types; WINDOW_UPDATEs aside), no error."""

    id: str
    wire: Wire
    expect: tuple[str, ...] | tuple[str, ErrorCode]
    role: str = "server"
    setup: str = "open"
    replies: tuple[int, ...] = ()
    on: str = "sid"  # the stream a stream error is expected on: ctx.sid, NEW, or the client's "pending" one


NEW = 101  # a stream id above every one the fixture opened (client-initiated, odd)


def _opening(headers: list[tuple[str, str]]) -> Wire:
    """HEADERS opening stream NEW with ``headers``."""
    return lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(headers))


def _pri(dep: int, weight: int = 15, exclusive: bool = False) -> bytes:
    return U32.pack(dep | (0x80000000 if exclusive else 0)) + bytes([weight])


CASES = [
    # --------------------------------------------------------------------- 4.1 / 4.2 / 5.5 frame format, extension
    Case("unknown type on stream 0 is ignored", lambda c: frame(0xEE, 0xFF, 0, b"whatever"), ("ok",)),
    Case("unknown type on an open stream is ignored", lambda c: frame(0x20, 0xFF, c.sid, b"x" * 100), ("ok",)),
    Case("unknown type on an idle stream is ignored", lambda c: frame(0x21, 0, NEW, b""), ("ok",)),
    Case(
        "unknown type inside a header block is a protocol error",
        lambda c: frame(hbone.HEADERS, 0, NEW, block(CONNECT)[:2]) + frame(0xEE, 0, 0, b""),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "undefined PING flags are ignored (answered)",
        lambda c: frame(hbone.PING, 0xFE, 0, b"12345678"),
        ("ok",),
        replies=(hbone.PING,),
    ),
    Case(
        "reserved bit of the stream id is ignored (WINDOW_UPDATE)",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, c.sid | 0x80000000, U32.pack(1)),
        ("ok",),
    ),
    Case(
        "reserved bit of a WINDOW_UPDATE increment is ignored",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, c.sid, U32.pack(0x80000001)),
        ("ok",),
    ),
    Case(
        "HEADERS longer than our SETTINGS_MAX_FRAME_SIZE",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, b"\0" * (c.server.settings.max_frame_size + 1)),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "SETTINGS longer than our SETTINGS_MAX_FRAME_SIZE",
        lambda c: frame(hbone.SETTINGS, 0, 0, b"\0" * (c.server.settings.max_frame_size + 2)),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    # --------------------------------------------------------------------- frames that must not be on stream 0
    Case("DATA on stream 0", lambda c: frame(hbone.DATA, 0, 0, b"x"), ("conn", ErrorCode.PROTOCOL_ERROR)),
    Case(
        "HEADERS on stream 0",
        lambda c: frame(hbone.HEADERS, END_HEADERS, 0, block(CONNECT)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "CONTINUATION on stream 0",
        lambda c: frame(hbone.CONTINUATION, END_HEADERS, 0, b""),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "PUSH_PROMISE from a client",
        lambda c: frame(hbone.PUSH_PROMISE, END_HEADERS, c.sid, U32.pack(2) + block(CONNECT)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "WINDOW_UPDATE on an even stream the client never saw (client)",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, 2, U32.pack(1)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
        role="client",
    ),
    # --------------------------------------------------------------------- 5.1.1 stream identifiers
    Case(
        "client HEADERS on an even stream",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW + 1, block(CONNECT)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "server HEADERS on an even (push) stream",
        lambda c: frame(hbone.HEADERS, END_HEADERS, 2, block([(":status", "200")])),
        ("conn", ErrorCode.PROTOCOL_ERROR),
        role="client",
    ),
    Case(
        "server HEADERS on a stream the client never opened",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block([(":status", "200")])),
        ("conn", ErrorCode.PROTOCOL_ERROR),
        role="client",
    ),
    Case(
        "HEADERS without END_STREAM reusing a closed stream id",
        lambda c: frame(hbone.HEADERS, END_HEADERS, c.sid, block(CONNECT)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
        setup="closed",
    ),
    # --------------------------------------------------------------------- 5.1 stream states
    Case("idle: DATA", lambda c: frame(hbone.DATA, 0, NEW, b"x"), ("conn", ErrorCode.PROTOCOL_ERROR)),
    Case(
        "idle: DATA (client)", lambda c: frame(hbone.DATA, 0, NEW, b"x"), ("conn", ErrorCode.PROTOCOL_ERROR), "client"
    ),
    Case(
        "idle: RST_STREAM", lambda c: frame(hbone.RST_STREAM, 0, NEW, U32.pack(0)), ("conn", ErrorCode.PROTOCOL_ERROR)
    ),
    Case(
        "idle: WINDOW_UPDATE",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, NEW, U32.pack(1)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "idle: CONTINUATION",
        lambda c: frame(hbone.CONTINUATION, END_HEADERS, NEW, block(CONNECT)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "half-closed (remote): DATA",
        lambda c: frame(hbone.DATA, 0, c.sid, b"late"),
        ("stream", ErrorCode.STREAM_CLOSED),
        setup="half_closed_remote",
    ),
    Case(
        "half-closed (remote): HEADERS",
        lambda c: frame(hbone.HEADERS, END_HEADERS | END_STREAM, c.sid, block([("x-trailer", "1")])),
        ("stream", ErrorCode.STREAM_CLOSED),
        setup="half_closed_remote",
    ),
    Case(
        "half-closed (remote): HEADERS (client)",
        lambda c: frame(hbone.HEADERS, END_HEADERS | END_STREAM, c.sid, block([("x-trailer", "1")])),
        ("stream", ErrorCode.STREAM_CLOSED),
        role="client",
        setup="half_closed_remote",
    ),
    Case(
        "half-closed (remote): CONTINUATION with no header block open",
        lambda c: frame(hbone.CONTINUATION, END_HEADERS, c.sid, b""),
        ("conn", ErrorCode.PROTOCOL_ERROR),
        setup="half_closed_remote",
    ),
    Case(
        "half-closed (remote): WINDOW_UPDATE is accepted",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, c.sid, U32.pack(100)),
        ("ok",),
        setup="half_closed_remote",
    ),
    Case(
        "half-closed (remote): PRIORITY is accepted",
        lambda c: frame(hbone.PRIORITY, 0, c.sid, _pri(0)),
        ("ok",),
        setup="half_closed_remote",
    ),
    Case(
        "closed by our RST_STREAM: DATA in flight is discarded",
        lambda c: frame(hbone.DATA, END_STREAM, c.sid, b"in flight"),
        ("ok",),
        setup="closed_by_us",
    ),
    Case(
        "closed by our RST_STREAM: WINDOW_UPDATE and RST_STREAM in flight are discarded",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, c.sid, U32.pack(9)) + frame(hbone.RST_STREAM, 0, c.sid, U32.pack(8)),
        ("ok",),
        setup="closed_by_us",
    ),
    Case(
        "closed by our RST_STREAM: a response in flight is discarded (client)",
        lambda c: frame(hbone.HEADERS, END_HEADERS, c.sid, block([("x-trailer", "1")])),
        ("ok",),
        role="client",
        setup="closed_by_us",
    ),
    # RFC 9113 5.1 lets a closed stream's frames be discarded; h2spec (7540) wants STREAM_CLOSED here.
    Case("closed: DATA is discarded", lambda c: frame(hbone.DATA, 0, c.sid, b"x"), ("ok",), setup="closed"),
    Case("closed: PRIORITY is accepted", lambda c: frame(hbone.PRIORITY, 0, c.sid, _pri(0)), ("ok",), setup="closed"),
    Case(
        "open: a second HEADERS without END_STREAM",
        lambda c: frame(hbone.HEADERS, END_HEADERS, c.sid, block([("x-more", "1")])),
        ("stream", ErrorCode.PROTOCOL_ERROR),
    ),
    # --------------------------------------------------------------------- 5.3 / 6.3 priority
    Case(
        "PRIORITY on an idle stream, then HEADERS opening a lower one",
        lambda c: frame(hbone.PRIORITY, 0, NEW + 20, _pri(0)) + frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT)),
        ("ok",),
    ),
    Case("PRIORITY weight 256", lambda c: frame(hbone.PRIORITY, 0, c.sid, _pri(0, 255)), ("ok",)),
    Case("PRIORITY exclusive dependency", lambda c: frame(hbone.PRIORITY, 0, c.sid, _pri(c.other, 1, True)), ("ok",)),
    Case("PRIORITY on stream 0", lambda c: frame(hbone.PRIORITY, 0, 0, _pri(1)), ("conn", ErrorCode.PROTOCOL_ERROR)),
    Case(
        "PRIORITY of 4 octets on an open stream",
        lambda c: frame(hbone.PRIORITY, 0, c.sid, b"\x80\0\0\1"),
        ("stream", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "PRIORITY of 6 octets on an idle stream (no RST_STREAM on idle)",
        lambda c: frame(hbone.PRIORITY, 0, NEW, b"\0" * 6),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "PRIORITY of 4 octets on a closed stream is discarded",
        lambda c: frame(hbone.PRIORITY, 0, c.sid, b"\0" * 4),
        ("ok",),
        setup="closed",
    ),
    Case(
        "PRIORITY depending on its own open stream",
        lambda c: frame(hbone.PRIORITY, 0, c.sid, _pri(c.sid)),
        ("stream", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "PRIORITY depending on itself, idle stream",
        lambda c: frame(hbone.PRIORITY, 0, NEW, _pri(NEW)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "HEADERS opening a stream that depends on itself",
        lambda c: frame(hbone.HEADERS, END_HEADERS | PRIORITY_FLAG, NEW, _pri(NEW) + block(CONNECT)),
        ("stream", ErrorCode.PROTOCOL_ERROR),
        on="new",
    ),
    Case(
        "HEADERS (trailers) making an open stream depend on itself",
        lambda c: frame(hbone.HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, c.sid, _pri(c.sid) + b""),
        ("stream", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "response HEADERS depending on itself (client)",
        lambda c: frame(
            hbone.HEADERS,
            END_HEADERS | PRIORITY_FLAG,
            c.extra["pending"],
            _pri(c.extra["pending"]) + block([(":status", "200")]),
        ),
        ("stream", ErrorCode.PROTOCOL_ERROR),
        role="client",
        setup="pending",
        on="pending",
    ),
    Case(
        "HEADERS with PRIORITY flag but 3 octets",
        lambda c: frame(hbone.HEADERS, END_HEADERS | PRIORITY_FLAG, NEW, b"\0\0\0"),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "padded HEADERS with PRIORITY flag but no room for the priority fields",
        lambda c: frame(hbone.HEADERS, END_HEADERS | PRIORITY_FLAG | PADDED, NEW, b"\0\0\0\0\0"),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "HEADERS with priority, padding and dependency on another stream are accepted",
        lambda c: frame(
            hbone.HEADERS,
            END_HEADERS | PRIORITY_FLAG | PADDED,
            NEW,
            b"\x03" + _pri(c.sid, 200) + block(CONNECT) + b"\0" * 3,
        ),
        ("ok",),
    ),
    Case(
        "PRIORITY between HEADERS and CONTINUATION",
        lambda c: frame(hbone.HEADERS, 0, NEW, block(CONNECT)[:2]) + frame(hbone.PRIORITY, 0, NEW, _pri(0)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    # --------------------------------------------------------------------- 6.1 / 6.2 padding
    Case(
        "HEADERS pad length equal to the payload",
        lambda c: frame(hbone.HEADERS, END_HEADERS | PADDED, NEW, b"\x05" + b"\0" * 4),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "padded HEADERS with an empty payload",
        lambda c: frame(hbone.HEADERS, END_HEADERS | PADDED, NEW, b""),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "HEADERS whose padding leaves exactly the block",
        lambda c: frame(hbone.HEADERS, END_HEADERS | PADDED, NEW, b"\x04" + block(CONNECT) + b"\0" * 4),
        ("ok",),
    ),
    Case(
        "DATA pad length equal to the payload",
        lambda c: frame(hbone.DATA, PADDED, c.sid, b"\x04abc"),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "padded DATA with an empty payload",
        lambda c: frame(hbone.DATA, PADDED, c.sid, b""),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case("padded DATA of only a zero pad length", lambda c: frame(hbone.DATA, PADDED, c.sid, b"\0"), ("ok",)),
    # --------------------------------------------------------------------- 6.4 RST_STREAM
    Case(
        "RST_STREAM on stream 0",
        lambda c: frame(hbone.RST_STREAM, 0, 0, U32.pack(0)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "RST_STREAM of 3 octets",
        lambda c: frame(hbone.RST_STREAM, 0, c.sid, b"\0\0\0"),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    # --------------------------------------------------------------------- 6.5 SETTINGS
    Case(
        "SETTINGS ACK with a payload",
        lambda c: frame(hbone.SETTINGS, hbone.FLAG_ACK, 0, b"\0" * 6),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "SETTINGS on a stream",
        lambda c: frame(hbone.SETTINGS, 0, c.sid, b""),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "SETTINGS_INITIAL_WINDOW_SIZE 2^31",
        lambda c: settings_frame((hbone.S_INITIAL_WINDOW_SIZE, 2**31)),
        ("conn", ErrorCode.FLOW_CONTROL_ERROR),
    ),
    Case(
        "SETTINGS_MAX_FRAME_SIZE 2^24",
        lambda c: settings_frame((hbone.S_MAX_FRAME_SIZE, 2**24)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "SETTINGS with an unknown identifier is acknowledged",
        lambda c: settings_frame((0xFF, 1), (0x8, 1), (0x9, 1)),
        ("ok",),
        replies=(hbone.SETTINGS,),
    ),
    Case(
        "SETTINGS with more entries than any peer needs (nghttp2's max_settings)",
        lambda c: settings_frame(*[(0xF0 + i % 8, i) for i in range(hbone.MAX_SETTINGS_ENTRIES + 1)]),
        ("conn", ErrorCode.ENHANCE_YOUR_CALM),
    ),
    Case(
        "SETTINGS_INITIAL_WINDOW_SIZE pushing an open stream's window past 2^31-1",
        lambda c: (
            frame(hbone.WINDOW_UPDATE, 0, c.sid, U32.pack(2**31 - 1 - c.server.send_window(c.sid)))
            + settings_frame((hbone.S_INITIAL_WINDOW_SIZE, c.server.peer_initial_window + 1))
        ),
        ("conn", ErrorCode.FLOW_CONTROL_ERROR),
    ),
    Case(
        "SETTINGS ACK that acknowledges nothing is ignored",
        lambda c: frame(hbone.SETTINGS, hbone.FLAG_ACK, 0, b""),
        ("ok",),
    ),
    # --------------------------------------------------------------------- 6.7 PING, 6.8 GOAWAY
    Case("PING ACK is not answered", lambda c: frame(hbone.PING, hbone.FLAG_ACK, 0, b"12345678"), ("ok",)),
    Case("PING on a stream", lambda c: frame(hbone.PING, 0, c.sid, b"12345678"), ("conn", ErrorCode.PROTOCOL_ERROR)),
    Case("PING of 7 octets", lambda c: frame(hbone.PING, 0, 0, b"1234567"), ("conn", ErrorCode.FRAME_SIZE_ERROR)),
    Case(
        "GOAWAY on a stream",
        lambda c: frame(hbone.GOAWAY, 0, c.sid, struct.pack(">LL", 0, 0)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case("GOAWAY of 7 octets", lambda c: frame(hbone.GOAWAY, 0, 0, b"\0" * 7), ("conn", ErrorCode.FRAME_SIZE_ERROR)),
    # --------------------------------------------------------------------- 6.9 WINDOW_UPDATE
    Case(
        "WINDOW_UPDATE of 3 octets",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, c.sid, b"\0\0\1"),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "WINDOW_UPDATE of 5 octets on the connection",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, 0, b"\0\0\0\0\1"),
        ("conn", ErrorCode.FRAME_SIZE_ERROR),
    ),
    Case(
        "connection WINDOW_UPDATE of 0",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, 0, U32.pack(0)),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "stream WINDOW_UPDATEs summing past 2^31-1",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, c.sid, U32.pack(2**30)) * 2,
        ("stream", ErrorCode.FLOW_CONTROL_ERROR),
    ),
    Case(
        "connection WINDOW_UPDATEs summing past 2^31-1",
        lambda c: frame(hbone.WINDOW_UPDATE, 0, 0, U32.pack(2**30)) * 2,
        ("conn", ErrorCode.FLOW_CONTROL_ERROR),
    ),
    # --------------------------------------------------------------------- 6.10 CONTINUATION
    Case(
        "CONTINUATION on stream 0 inside a header block",
        lambda c: frame(hbone.HEADERS, 0, NEW, block(CONNECT)[:2]) + frame(hbone.CONTINUATION, END_HEADERS, 0, b""),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "CONTINUATION after HEADERS with END_HEADERS",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT)) + frame(hbone.CONTINUATION, END_HEADERS, NEW),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "CONTINUATION after CONTINUATION with END_HEADERS",
        lambda c: (
            frame(hbone.HEADERS, 0, NEW, block(CONNECT)[:2])
            + frame(hbone.CONTINUATION, END_HEADERS, NEW, block(CONNECT)[2:])
            + frame(hbone.CONTINUATION, END_HEADERS, NEW, b"")
        ),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "HEADERS for another stream inside a header block",
        lambda c: (
            frame(hbone.HEADERS, 0, NEW, block(CONNECT)[:2])
            + frame(hbone.HEADERS, END_HEADERS, NEW + 2, block(CONNECT))
        ),
        ("conn", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "a header block in one HEADERS and three CONTINUATIONs",
        lambda c: (
            frame(hbone.HEADERS, 0, NEW, block(CONNECT)[:3])
            + frame(hbone.CONTINUATION, 0, NEW, block(CONNECT)[3:6])
            + frame(hbone.CONTINUATION, 0, NEW, b"")
            + frame(hbone.CONTINUATION, END_HEADERS, NEW, block(CONNECT)[6:])
        ),
        ("ok",),
    ),
    # --------------------------------------------------------------------- RFC 7541 (h2spec hpack group)
    Case(
        "HPACK indexed field of index 0",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, b"\x80"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK index beyond both tables",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, b"\xff\x80\x01"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK literal whose name index is beyond both tables",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, b"\x0f\xf0\x01\x01a"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK table size update at the end of a block",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT) + b"\x20"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK table size update above SETTINGS_HEADER_TABLE_SIZE",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, b"\x3f\xe2\x1f" + block(CONNECT)),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK Huffman string with padding longer than 7 bits",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT) + b"\x00\x82\xff\xff\x01a"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK Huffman string padded with zeros",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT) + b"\x00\x81\x00\x01a"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK Huffman string containing EOS",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT) + b"\x00\x84\xff\xff\xff\xff\x01a"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK integer running past the block",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT) + b"\x7f\xff"),
        ("conn", ErrorCode.COMPRESSION_ERROR),
    ),
    Case(
        "HPACK two table size updates at the start, Huffman and incremental indexing are accepted",
        lambda c: frame(
            hbone.HEADERS,
            END_HEADERS,
            NEW,
            b"\x20\x3f\xe1\x1f" + Encoder().encode([*CONNECT, ("baggage", "a=1")], huffman=True),
        ),
        ("ok",),
    ),
    # --------------------------------------------------------------------- RFC 9113 8 / RFC 9110 9.3.6 CONNECT
    *[
        Case(f"CONNECT {why} gets 400 and PROTOCOL_ERROR", _opening(headers), ("400", ErrorCode.PROTOCOL_ERROR))
        for why, headers in [
            ("with :scheme", [*CONNECT, (":scheme", "https")]),
            ("with :protocol (no extended CONNECT)", [*CONNECT, (":protocol", "websocket"), (":scheme", "https")]),
            ("with :status", [*CONNECT, (":status", "200")]),
            ("with an unknown pseudo-header", [*CONNECT, (":foo", "1")]),
            ("with :method twice", [*CONNECT, (":method", "CONNECT")]),
            ("with :authority twice", [*CONNECT, (":authority", "10.0.0.9:81")]),
            ("with an empty :authority", [(":method", "CONNECT"), (":authority", "")]),
            ("without :method", [(":authority", "10.0.0.9:80")]),
            ("with te: gzip", [*CONNECT, ("te", "gzip")]),
            ("with transfer-encoding", [*CONNECT, ("transfer-encoding", "chunked")]),
            ("with keep-alive", [*CONNECT, ("keep-alive", "1")]),
            ("with proxy-connection", [*CONNECT, ("proxy-connection", "close")]),
            ("with upgrade", [*CONNECT, ("upgrade", "h2c")]),
            ("with an empty header name", [*CONNECT, ("", "1")]),
            ("with a DEL in a header name", [*CONNECT, ("x\x7f", "1")]),
            ("with a non-ASCII header name", [*CONNECT, ("x\xe9", "1")]),
        ]
    ],
    # Well-formed requests this server does not serve: refused (400) without error, the client told to stop
    # sending with NO_ERROR (RFC 9113 8.1); methods are case-sensitive (RFC 9110 9.1).
    Case(
        "a lowercase connect method gets 400 and NO_ERROR",
        _opening([(":method", "connect"), (":authority", "10.0.0.9:80")]),
        ("400", ErrorCode.NO_ERROR),
    ),
    Case(
        "a GET gets 400 and NO_ERROR",
        _opening([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.9:80")]),
        ("400", ErrorCode.NO_ERROR),
    ),
    Case(
        "CONNECT with te: trailers is accepted",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block([*CONNECT, ("te", "trailers")])),
        ("ok",),
    ),
    Case(
        "CONNECT with content-length is accepted (a CONNECT has no content: RFC 9110 9.3.6)",
        lambda c: frame(hbone.HEADERS, END_HEADERS, NEW, block([*CONNECT, ("content-length", "0")])),
        ("ok",),
    ),
    Case(
        "trailers carrying a pseudo-header",
        lambda c: frame(hbone.HEADERS, END_HEADERS | END_STREAM, c.sid, block([(":authority", "a:1")])),
        ("stream", ErrorCode.PROTOCOL_ERROR),
    ),
    Case(
        "trailers with an uppercase name",
        lambda c: frame(hbone.HEADERS, END_HEADERS | END_STREAM, c.sid, block([("X-Trailer", "1")])),
        ("stream", ErrorCode.PROTOCOL_ERROR),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case: Case) -> None:
    ctx = make_ctx("open" if case.setup == "pending" else case.setup, case.role)
    if case.setup == "pending":  # a CONNECT of the client's still waiting for its answer
        ctx.extra["pending"] = ctx.client.send_connect("10.0.0.4:80")
        exchange(ctx.client, ctx.server)
    receiver = ctx.server if case.role == "server" else ctx.client
    wire = case.wire(ctx)
    events = receiver.receive_data(wire)
    sent = wire_frames(receiver)
    kind = case.expect[0]
    if kind == "conn":
        code = case.expect[1]
        assert isinstance(events[-1], ConnectionTerminated), events
        assert (events[-1].error_code, events[-1].remote) == (code, False), events[-1]
        assert receiver.closed
        goaways = [f for f in sent if f[0] == hbone.GOAWAY]
        assert len(goaways) == 1 and struct.unpack(">LL", goaways[0][3][:8])[1] == code
        assert receiver.receive_data(frame(hbone.PING, 0, 0, b"12345678")) == []  # nothing parsed after
        return
    assert not receiver.closed, events
    assert not any(isinstance(e, ConnectionTerminated) for e in events), events
    if kind == "stream":
        code = case.expect[1]
        target = {"sid": ctx.sid, "new": NEW, "pending": ctx.extra.get("pending", 0)}[case.on]
        assert [f for f in sent if f[0] != hbone.WINDOW_UPDATE] == [(hbone.RST_STREAM, 0, target, U32.pack(code))]
        if case.on == "new":  # never opened: refused, reported as a rejected request
            assert [(type(e), getattr(e, "stream_id", None)) for e in events] == [(RequestRejected, NEW)], events
        else:
            resets = [(e.stream_id, e.error_code, e.remote) for e in events if isinstance(e, StreamReset)]
            assert resets == [(target, code, False)], events
        assert not receiver.stream_is_open(target)
        assert not any(isinstance(e, (RequestReceived, ResponseReceived)) and e.stream_id == target for e in events)
    elif kind == "400":
        assert [type(e) for e in events] == [RequestRejected], events
        assert events[0].status == 400  # type: ignore[union-attr]
        assert sent[0][:3] == (hbone.HEADERS, END_HEADERS | END_STREAM, NEW)
        assert sent[1:] == [(hbone.RST_STREAM, 0, NEW, U32.pack(case.expect[1]))]
    else:
        assert not any(isinstance(e, (StreamReset, RequestRejected)) for e in events), events
        assert [f[0] for f in sent if f[0] not in (hbone.WINDOW_UPDATE,)] == list(case.replies), sent
    # the rest of the connection is served: the other tunnel still carries bytes both ways
    peer = ctx.client if receiver is ctx.server else ctx.server
    got = receiver.receive_data(frame(hbone.DATA, 0, ctx.other, b"still here"))
    assert [bytes(e.data) for e in got if isinstance(e, DataReceived)] == [b"still here"]
    assert receiver.send_data(ctx.other, b"and back") == 8
    back = peer.receive_data(b"".join(bytes(x) for x in receiver.data_to_send()))
    assert b"and back" in b"".join(bytes(e.data) for e in back if isinstance(e, DataReceived))


# ------------------------------------------------------------------------------------------------ beyond the table


def test_settings_initial_window_is_applied_in_order_last_value_wins() -> None:
    """RFC 9113 6.5.3: values are processed in the order they appear; several INITIAL_WINDOW_SIZE values in one
    frame leave the windows as the last one says (h2spec 6.5.3/1)."""
    client, server = pair()
    sid = open_tunnel(client, server)
    before = client.send_window(sid)
    initial = client.peer_initial_window
    events = client.receive_data(
        settings_frame((hbone.S_INITIAL_WINDOW_SIZE, 100), (hbone.S_INITIAL_WINDOW_SIZE, initial + 7))
    )
    assert WindowOpened(0) in events and SettingsChanged() in events
    assert client.send_window(sid) == before + 7 and client.peer_initial_window == initial + 7
    assert client.send_data(sid, b"x" * 100) == 100
    client.receive_data(settings_frame((hbone.S_INITIAL_WINDOW_SIZE, initial + 9), (hbone.S_INITIAL_WINDOW_SIZE, 1)))
    assert client._streams[sid].send_window == before - 100 + 1 - initial < 0  # negative, tracked (6.9.2)
    assert client.send_window(sid) == 0 and client.send_data(sid, b"y") == 0


def test_a_huge_settings_frame_is_refused_before_it_costs_the_loop() -> None:
    """One 1 MiB SETTINGS frame (we advertise 1 MiB frames) of 174,762 alternating INITIAL_WINDOW_SIZE entries,
    with 200 streams open, walked every stream for every entry: ~5 s of the event loop in one call, measured.
    nghttp2 refuses more than 32 entries (ENHANCE_YOUR_CALM); so do we, and apply the window once per frame."""
    client, server = pair()
    for i in range(20):
        open_tunnel(client, server, f"10.0.1.{i}:80")
    n = server.settings.max_frame_size // 6
    payload = b"".join(struct.pack(">HL", hbone.S_INITIAL_WINDOW_SIZE, 65535 + i % 2) for i in range(n))
    events = server.receive_data(frame(hbone.SETTINGS, 0, 0, payload))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM
    # 32 entries are fine, and the window moves once
    client2, server2 = pair()
    sid = open_tunnel(client2, server2)
    before = server2._streams[sid].send_window
    initial = server2.peer_initial_window
    pairs = [(hbone.S_INITIAL_WINDOW_SIZE, 65535 + i % 2) for i in range(hbone.MAX_SETTINGS_ENTRIES)]
    events = server2.receive_data(settings_frame(*pairs))
    assert SettingsChanged() in events and not server2.closed
    assert server2._streams[sid].send_window == before + 65536 - initial


def test_peer_driven_stream_resets_are_bounded_per_connection() -> None:
    """A peer that makes us reset stream after stream (a zero WINDOW_UPDATE on each, CVE-2025-8671 "MadeYouReset")
    gets a connection error after MAX_LOCAL_ERROR_RESETS, hyperium/h2's max_local_error_reset_streams (1024)."""
    _client, server = pair(server_settings=HboneSettings(max_concurrent_streams=2000))
    wire = bytearray()
    for i in range(hbone.MAX_LOCAL_ERROR_RESETS + 1):
        sid = 2 * i + 1
        wire += frame(hbone.HEADERS, END_HEADERS, sid, block(CONNECT))
        wire += frame(hbone.WINDOW_UPDATE, 0, sid, U32.pack(0))
    events = server.receive_data(bytes(wire))
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert len(resets) == hbone.MAX_LOCAL_ERROR_RESETS
    assert isinstance(events[-1], ConnectionTerminated)
    assert (events[-1].error_code, events[-1].reason) == (ErrorCode.ENHANCE_YOUR_CALM, "too_many_internal_resets")


def test_streams_the_peer_resets_itself_are_not_counted_as_ours() -> None:
    """Only resets the core sends count: a client cancelling its own tunnels (RST_STREAM CANCEL) is routine."""
    client, server = pair()
    for i in range(hbone.MAX_LOCAL_ERROR_RESETS + 10):
        sid = client.send_connect(f"10.0.{i // 250}.{i % 250}:80")
        client.reset_stream(sid)
        exchange(client, server)
    assert not server.closed and not client.closed


def test_advertised_header_table_size_reaches_the_peer() -> None:
    """HboneSettings.header_table_size bounds what our HPACK decoder accepts; unless advertised, the peer keeps
    the 4096 default and its encoder may use a table we refuse (RFC 7541 4.2 / RFC 9113 6.5.2)."""
    client, server = pair(server_settings=HboneSettings(header_table_size=256))
    assert client._encoder.hpack.header_table_size == 256
    sid = client.send_connect("10.0.0.2:8080", [("baggage", "x" * 100), ("x-a", "y" * 100)])
    at_server, _ = exchange(client, server)
    assert [type(e) for e in at_server] == [RequestReceived] and at_server[0] == RequestReceived(
        sid, "10.0.0.2:8080", [("baggage", "x" * 100), ("x-a", "y" * 100)]
    )
    assert not server.closed


def test_peer_text_in_reasons_is_bounded() -> None:
    """Reasons are logged per refused stream (tunnel.py logs RequestRejected.reason): a 60 KiB header name or
    GOAWAY debug data must not become a 60 KiB log line."""
    client, server = pair()
    events = server.receive_data(frame(hbone.HEADERS, END_HEADERS, NEW, block([*CONNECT, ("X" * 60000, "1")])))
    assert isinstance(events[0], RequestRejected) and len(events[0].reason) < 400
    events = client.receive_data(frame(hbone.GOAWAY, 0, 0, struct.pack(">LL", 0, 0) + b"d" * 60000))
    assert isinstance(events[0], ConnectionTerminated) and len(events[0].reason) <= hbone.MAX_REASON_TEXT


def test_unknown_error_codes_trigger_nothing_special() -> None:
    """RFC 9113 7: unknown error codes MUST NOT trigger special behaviour (h2spec 7/1, 7/2)."""
    client, server = pair()
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    events = server.receive_data(frame(hbone.RST_STREAM, 0, sid, U32.pack(0xDEAD)))
    assert events == [StreamReset(sid, 0xDEAD, True, "peer reset: 0xdead")]
    events = client.receive_data(frame(hbone.GOAWAY, 0, 0, struct.pack(">LL", other, 0xBEEF)))
    assert events == [ConnectionTerminated(0xBEEF, other, True, "")]
    assert client.stream_is_open(other) and not client.closed


def test_ping_flood_answers_are_counted_for_the_io_layer() -> None:
    """Each PING/SETTINGS the peer sends makes us queue an answer; ``replies`` is what tunnel.py bounds while the
    peer does not read (MAX_REPLIES_WHILE_PAUSED)."""
    _client, server = pair()
    before = server.replies
    server.receive_data(frame(hbone.PING, 0, 0, b"12345678") * 50 + settings_frame() * 50)
    assert server.replies - before == 100


def test_data_frame_of_exactly_16384_octets_with_default_settings() -> None:
    """RFC 9113 4.2: every endpoint takes frames up to 2^14 octets (h2spec 4.2/1), on both paths."""
    client, server = pair(server_settings=HboneSettings(max_frame_size=16384))
    sid = open_tunnel(client, server)
    wire = frame(hbone.DATA, 0, sid, b"z" * 16384)
    got = server.receive_single_data(memoryview(wire))
    assert got is not None and len(got[1]) == 16384
    events = server.receive_data(wire + frame(hbone.DATA, END_STREAM, sid | 0x80000000, b"r"))  # R bit ignored
    assert len(b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))) == 16385
    assert StreamEnded(sid) in events


def test_a_peer_reset_after_our_answer_still_lets_ping_through() -> None:
    """Sanity for the table's fixtures: PING round trip after a stream error (other streams and control go on)."""
    client, server = pair()
    sid = open_tunnel(client, server)
    server.receive_data(frame(hbone.WINDOW_UPDATE, 0, sid, U32.pack(0)))
    server.ping(b"abcdefgh")
    at_server, at_client = exchange(client, server)
    assert PingAcked(b"abcdefgh") in at_server
    assert StreamReset(sid, ErrorCode.PROTOCOL_ERROR, True, "peer reset: PROTOCOL_ERROR") in at_client


class _CountingStreams(dict[int, object]):
    """The core's stream table, counting the passes over all streams."""

    passes = 0

    def values(self):  # type: ignore[no-untyped-def]
        self.passes += 1
        return super().values()


def test_a_flood_of_initial_window_changes_walks_the_streams_once_per_read() -> None:
    """Each SETTINGS frame changing INITIAL_WINDOW_SIZE moved every open stream's window: with 200 streams a MiB of
    15-byte SETTINGS frames cost ~5 s of the loop (measured; ~0.8 s for a MiB of PINGs). The change is now applied
    once per receive_data call, with the same resulting windows."""
    client, server = pair()
    sids = [open_tunnel(client, server, f"10.0.2.{i}:80") for i in range(5)]
    before = {sid: server._streams[sid].send_window for sid in sids}
    initial = server.peer_initial_window
    counting = _CountingStreams(server._streams)
    server._streams = counting  # type: ignore[assignment]
    wire = b"".join(settings_frame((hbone.S_INITIAL_WINDOW_SIZE, initial + 1 + i % 2)) for i in range(1001))
    events = server.receive_data(wire)
    assert events.count(SettingsChanged()) == 1001 and not server.closed
    assert counting.passes == 1
    assert {sid: server._streams[sid].send_window for sid in sids} == {sid: w + 1 for sid, w in before.items()}


def test_streams_opened_and_windows_updated_within_the_read_of_a_window_change() -> None:
    """Between the SETTINGS and the end of the read, a stream opened gets the new initial window exactly, and a
    WINDOW_UPDATE's overflow check counts the change not applied yet."""
    client, server = pair()
    sid = open_tunnel(client, server)
    initial = server.peer_initial_window
    wire = settings_frame((hbone.S_INITIAL_WINDOW_SIZE, initial + 1000))
    wire += frame(hbone.HEADERS, END_HEADERS, NEW, block(CONNECT))
    # sid's window will be (its window + 1000): an update to exactly 2^31-1 with the change is fine ...
    room = 2**31 - 1 - (server._streams[sid].send_window + 1000)
    wire += frame(hbone.WINDOW_UPDATE, 0, sid, U32.pack(room))
    events = server.receive_data(wire)
    assert not server.closed and WindowOpened(sid) in events
    assert server._streams[NEW].send_window == initial + 1000
    assert server._streams[sid].send_window == 2**31 - 1
    # ... one more byte is a stream error, and a window change pushing any stream past it a connection error
    events = server.receive_data(frame(hbone.WINDOW_UPDATE, 0, sid, U32.pack(1)))
    assert [(type(e), e.error_code) for e in events if isinstance(e, StreamReset)] == [
        (StreamReset, ErrorCode.FLOW_CONTROL_ERROR)
    ]
    room = 2**31 - 1 - server._streams[NEW].send_window
    events = server.receive_data(
        frame(hbone.WINDOW_UPDATE, 0, NEW, U32.pack(room))
        + settings_frame((hbone.S_INITIAL_WINDOW_SIZE, initial + 1001))
    )
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.FLOW_CONTROL_ERROR


def _goaways(conn: HboneConnection) -> list[tuple[int, int]]:
    return [struct.unpack(">LL", f[3][:8]) for f in wire_frames(conn) if f[0] == hbone.GOAWAY]


def test_a_connection_error_after_a_graceful_goaway_is_still_told_to_the_peer() -> None:
    """A draining server (GOAWAY NO_ERROR) that then meets a protocol error sent nothing more: the peer saw a
    graceful shutdown and a closed socket. RFC 9113 5.4.1 (send GOAWAY with the error) and 6.8 (more GOAWAYs "if
    circumstances change", the last stream id never increased); h2's go_away_now does the same."""
    client, server = pair()
    sid = open_tunnel(client, server)
    server.goaway()
    assert _goaways(server) == [(sid, ErrorCode.NO_ERROR)]
    # a stream the client opened meanwhile is refused (and raises the last stream id seen, not the one announced)
    late = client.send_connect("10.0.0.7:80")
    at_server, _ = exchange(client, server)
    assert RequestRejected(late, 0, "refused_stream") in at_server
    events = server.receive_data(frame(hbone.PING, 0, sid, b"12345678"))
    assert events == [ConnectionTerminated(ErrorCode.PROTOCOL_ERROR, sid, False, "PING on a stream")]
    assert _goaways(server) == [(sid, ErrorCode.PROTOCOL_ERROR)]


def test_goaway_is_sent_once_per_kind() -> None:
    """goaway(): graceful once, then one with an error code (tunnel.py closing a draining connection for a
    reason), then nothing more."""
    client, server = pair()
    sid = open_tunnel(client, server)
    server.goaway()
    server.goaway()
    server.goaway(ErrorCode.INTERNAL_ERROR, "shutting down")
    server.goaway(ErrorCode.CANCEL)
    assert _goaways(server) == [(sid, ErrorCode.NO_ERROR), (sid, ErrorCode.INTERNAL_ERROR)]
    events = server.receive_data(frame(hbone.PING, 0, sid, b"12345678"))
    assert isinstance(events[-1], ConnectionTerminated) and _goaways(server) == []


def _fresh_server() -> HboneConnection:
    server = HboneConnection(client=False)
    server.initiate()
    server.data_to_send()
    return server


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (hbone.PREFACE + frame(hbone.PING, 0, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR),  # first frame not SETTINGS
        (hbone.PREFACE + frame(hbone.SETTINGS, hbone.FLAG_ACK, 0, b""), ErrorCode.PROTOCOL_ERROR),  # an ACK first
        (hbone.PREFACE + frame(hbone.HEADERS, END_HEADERS, 1, block(CONNECT)), ErrorCode.PROTOCOL_ERROR),
        (hbone.PREFACE[:-1] + b"X" + settings_frame(), ErrorCode.PROTOCOL_ERROR),  # preface wrong in its last byte
        (b"PRI * HTTP/2.0\r\n\r\n", None),  # half a preface: nothing yet
    ],
    ids=["ping-first", "ack-first", "headers-first", "bad-preface-tail", "half-preface"],
)
def test_connection_preface(wire: bytes, code: ErrorCode | None) -> None:
    """RFC 9113 3.4: the client preface is the magic then a SETTINGS frame (not an ACK); anything else is a
    connection error of type PROTOCOL_ERROR (h2spec 3.5)."""
    server = _fresh_server()
    events = server.receive_data(wire)
    if code is None:
        assert events == [] and not server.closed and server.data_to_send() == []
        return
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == code and server.closed


def test_preface_and_settings_byte_by_byte() -> None:
    """The preface and the first frames may arrive one byte at a time (h2spec generic 1)."""
    server = _fresh_server()
    wire = (
        hbone.PREFACE
        + settings_frame((hbone.S_MAX_FRAME_SIZE, 20000))
        + frame(hbone.HEADERS, END_HEADERS, 1, block(CONNECT))
    )
    events: list[hbone.Event] = []
    for i in range(len(wire)):
        events += server.receive_data(wire[i : i + 1])
    assert [type(e) for e in events] == [SettingsChanged, RequestReceived] and server.peer_max_frame_size == 20000


def test_client_refuses_a_server_whose_first_frame_is_not_settings() -> None:
    client = HboneConnection(client=True)
    client.initiate()
    client.data_to_send()
    events = client.receive_data(frame(hbone.PING, 0, 0, b"12345678"))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR


_FUZZ_IDS = [0, 1, 2, 3, 5, 7, NEW, NEW + 1, 2**31 - 1, 2**31 + 1]
_FUZZ_BLOCKS = [
    b"",
    block(CONNECT),
    block([(":status", "200")]),
    block([("x-trailer", "1")]),
    Encoder().encode([*CONNECT, ("baggage", "a=1")], huffman=True),
    b"\x80",
    b"\x3f\xe1\x1f",
]


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    ftype = draw(st.sampled_from([*range(10), 0x0A, 0xEE]))
    flags = draw(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x24, 0x25, 0x2D, 0xFF]))
    sid = draw(st.sampled_from(_FUZZ_IDS))
    if ftype in (hbone.HEADERS, hbone.CONTINUATION, hbone.PUSH_PROMISE):
        body = draw(st.sampled_from(_FUZZ_BLOCKS))
        pre = draw(st.sampled_from([b"", b"\x00", b"\x03", _pri(sid), b"\x01" + _pri(1)]))
        post = draw(st.sampled_from([b"", b"\0\0\0"]))
        payload = pre + body + post
    elif ftype == hbone.SETTINGS:
        pairs = draw(st.lists(st.tuples(st.integers(0, 10), st.sampled_from([0, 1, 2, 16384, 65535, 2**31]))))
        payload = b"".join(struct.pack(">HL", k, v & 0xFFFFFFFF) for k, v in pairs[:40])
        payload += draw(st.sampled_from([b"", b"\0"]))
    elif ftype in (hbone.WINDOW_UPDATE, hbone.RST_STREAM):
        payload = U32.pack(draw(st.sampled_from([0, 1, 65535, 2**31 - 1, 2**32 - 1])))[
            : draw(st.sampled_from([4, 4, 3]))
        ]
    else:
        payload = draw(st.binary(max_size=40))
    return frame(ftype, flags, sid, payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_frames(), min_size=1, max_size=12), role_client=st.booleans())
def test_structured_frame_fuzz_never_raises_nor_hits_an_internal_error(frames: list[bytes], role_client: bool) -> None:
    """Frames shaped like the real ones (header blocks, priority fields, padding, settings, windows) in any order
    on any stream: the core answers every one with acceptance, a stream error or a protocol connection error,
    never an exception and never INTERNAL_ERROR (what receive_data turns a bug into)."""
    client, server = pair()
    open_tunnel(client, server)
    open_tunnel(client, server, "10.0.0.3:80")
    receiver = client if role_client else server
    for f in frames:
        events = receiver.receive_data(f)
        receiver.data_to_send()
        for e in events:
            assert not (isinstance(e, ConnectionTerminated) and e.error_code == ErrorCode.INTERNAL_ERROR), e
        if receiver.closed:
            break
    # whatever happened, the windows stayed within the protocol's bounds
    assert (receiver._conn_send_window <= 2**31 - 1 and receiver._window_shift == 0) or receiver.closed
    assert all(s.send_window <= 2**31 - 1 for s in receiver._streams.values()) or receiver.closed


def test_we_never_send_beyond_a_window_of_one() -> None:
    """h2spec 6.9.1/1: after SETTINGS_INITIAL_WINDOW_SIZE = 1, no DATA frame may exceed the space available; the
    rest goes out as the peer's WINDOW_UPDATEs allow, never beyond them (both send paths)."""
    client, server = pair()
    server.receive_data(settings_frame((hbone.S_INITIAL_WINDOW_SIZE, 1)))
    server.data_to_send()
    sid = client.send_connect("10.0.0.2:8080")
    exchange(client, server)
    server.send_response(sid, 200)
    assert server.data_frame(sid, b"ab") is None  # the latency path refuses what it cannot send whole
    assert server.send_data(sid, b"hello") == 1
    assert server.send_data(sid, b"ello") == 0
    data = [f for f in wire_frames(server) if f[0] == hbone.DATA]
    assert [(f[2], f[3]) for f in data] == [(sid, b"h")]
    server.receive_data(frame(hbone.WINDOW_UPDATE, 0, sid, U32.pack(2)))
    assert server.send_data(sid, b"ello") == 2
    assert [f[3] for f in wire_frames(server) if f[0] == hbone.DATA] == [b"el"]
