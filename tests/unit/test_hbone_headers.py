"""Header lists in the sans-IO HBONE core: oversized lists are a stream error (431 / RST_STREAM) that keeps the
connection and its HPACK state, and responses get the RFC 9113 8.2/8.3 checks requests get. Raw frames only."""

from __future__ import annotations

import struct

import pytest
from hpack import Decoder, Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import hbone
from agent.hbone import (
    ConnectionTerminated,
    ErrorCode,
    HboneConnection,
    HboneSettings,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from tests.unit.test_hbone_core import HDR, data_of, exchange, frame, open_tunnel, pair, settings_frame

LIMIT = 16 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE in these tests; the hard limit is twice that
# 200 fields of 5-6 + 100 + 32 bytes: ~27.6 KB decoded, between the limit and the hard limit. Small enough that
# the newest ~29 of them stay in the 4 KiB dynamic table, where later blocks refer to them by index.
BIG = [(f"x-h{i}", "v" * 100) for i in range(200)]
END_HEADERS = hbone.FLAG_END_HEADERS


def frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in ``wire``."""
    out = []
    pos = 0
    while pos < len(wire):
        hi, lo, ftype, flags, sid = HDR.unpack_from(wire, pos)
        n = (hi << 16) | lo
        out.append((ftype, flags, sid, wire[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


def sent(conn: HboneConnection) -> list[tuple[int, int, int, bytes]]:
    return frames(b"".join(bytes(x) for x in conn.data_to_send()))


# ---------------------------------------------------------------------------------------------------- oversized


def test_oversized_request_gets_431_and_the_connection_carries_on() -> None:
    client, server = pair(server_settings=HboneSettings(max_header_list_size=LIMIT))
    busy = open_tunnel(client, server)
    big = client.send_connect("10.0.0.2:8080", BIG)
    client.send_data(big, b"early data for a stream about to be refused")
    wire = b"".join(bytes(x) for x in client.data_to_send())
    at_server = server.receive_data(wire)
    assert [type(e) for e in at_server] == [RequestRejected]
    rejected = at_server[0]
    assert isinstance(rejected, RequestRejected) and (rejected.stream_id, rejected.status) == (big, 431)
    assert rejected.reason.startswith("header_too_large: request header list of ")
    assert rejected.reason.endswith(f"exceeds {LIMIT}")
    assert not server.closed and not server.stream_is_open(big)
    # on the wire: HEADERS(:status 431, END_STREAM), then RST_STREAM(NO_ERROR): the request is refused, not failed
    out = sent(server)
    headers = [f for f in out if f[0] == hbone.HEADERS]
    assert len(headers) == 1 and headers[0][2] == big and headers[0][1] & hbone.FLAG_END_STREAM
    assert Decoder().decode(headers[0][3]) == [(":status", "431")]
    assert (hbone.RST_STREAM, 0, big, struct.pack(">L", ErrorCode.NO_ERROR)) in out
    assert not any(f[0] == hbone.GOAWAY for f in out)
    # the client sees an ordinary final answer on that stream
    at_client = client.receive_data(b"".join(frame(*f) for f in out))
    assert ResponseReceived(big, 431, []) in at_client and not client.closed
    # the stream opened before carries data both ways
    client.send_data(busy, b"up")
    at_server, _ = exchange(client, server)
    assert data_of(at_server, busy) == b"up"
    server.send_data(busy, b"down")
    _, at_client = exchange(client, server)
    assert data_of(at_client, busy) == b"down"


def test_after_a_431_the_hpack_tables_are_still_in_sync() -> None:
    """The refused block inserted its fields into the server's dynamic table: a later request made of references
    to them must decode to what the client sent."""
    client, server = pair(server_settings=HboneSettings(max_header_list_size=LIMIT))
    big = client.send_connect("10.0.0.2:8080", BIG)
    at_server, _ = exchange(client, server)
    assert [(type(e), getattr(e, "status", None)) for e in at_server] == [(RequestRejected, 431)]
    later = [("x-h199", "v" * 100), ("x-h180", "v" * 100)]
    sid = client.send_connect("10.0.0.2:8080", later)
    block = sent(client)[0][3]
    assert b"x-h" not in block and block[-1] & block[-2] & 0x80  # both fields by index: the test is about the table
    at_server = server.receive_data(frame(hbone.HEADERS, END_HEADERS, sid, block))
    assert at_server == [RequestReceived(sid, "10.0.0.2:8080", later)]
    assert big != sid and not server.closed


def test_oversized_request_through_the_dynamic_table_gets_431() -> None:
    """A small block that inflates past the limit (but not the hard limit) by repeating a table entry."""
    _client, server = pair(server_settings=HboneSettings(max_header_list_size=LIMIT))
    enc = Encoder()
    block = enc.encode([(":method", "CONNECT"), (":authority", "a:1"), ("x-big", "v" * 3000)])
    block += b"\xbe" * 5  # five more references to the 3 KiB entry: ~18 KB decoded
    events = server.receive_data(frame(hbone.HEADERS, END_HEADERS, 1, block))
    assert [(type(e), getattr(e, "status", None)) for e in events] == [(RequestRejected, 431)]
    assert not server.closed
    events = server.receive_data(
        frame(hbone.HEADERS, END_HEADERS, 3, enc.encode([(":method", "CONNECT"), (":authority", "a:1")]))
    )
    assert events == [RequestReceived(3, "a:1", [])]


def test_header_block_above_the_hard_limit_is_a_connection_error() -> None:
    """The encoded block is not buffered past twice the limit, whether or not it would fit once decoded."""
    _client, server = pair(server_settings=HboneSettings(max_header_list_size=LIMIT))
    block = Encoder().encode(
        [(":method", "CONNECT"), (":authority", "a:1"), ("x-big", "v" * (2 * LIMIT))], huffman=False
    )
    events = server.receive_data(
        frame(hbone.HEADERS, 0, 1, block[:LIMIT]) + frame(hbone.CONTINUATION, END_HEADERS, 1, block[LIMIT:])
    )
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert events[-1].reason.startswith("header_too_large: header block of ")


def test_header_list_above_the_hard_limit_is_a_connection_error() -> None:
    """Past the hard limit decoding stops mid-block: the tables are out of step and the connection must go."""
    _client, server = pair(server_settings=HboneSettings(max_header_list_size=LIMIT))
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "a:1"), ("x-big", "v" * 3000)])
    block += b"\xbe" * 12  # ~39 KB decoded
    events = server.receive_data(frame(hbone.HEADERS, END_HEADERS, 1, block))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.COMPRESSION_ERROR
    assert "header_too_large" in events[-1].reason and server.closed


def test_oversized_trailers_reset_that_stream_only() -> None:
    client, server = pair(server_settings=HboneSettings(max_header_list_size=LIMIT))
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    block = Encoder().encode(BIG)
    events = server.receive_data(frame(hbone.HEADERS, END_HEADERS | hbone.FLAG_END_STREAM, sid, block))
    assert len(events) == 1 and isinstance(events[0], StreamReset) and not events[0].remote
    assert events[0].error_code == ErrorCode.PROTOCOL_ERROR and events[0].reason.startswith("header_too_large")
    assert not server.closed and server.stream_is_open(other)


def test_oversized_response_resets_that_stream_and_keeps_the_pooled_connection() -> None:
    client, server = pair(client_settings=HboneSettings(max_header_list_size=LIMIT))
    busy = open_tunnel(client, server)
    big = client.send_connect("10.0.0.2:8080")
    exchange(client, server)
    server.send_response(big, 200, BIG)
    at_client = client.receive_data(b"".join(bytes(x) for x in server.data_to_send()))
    assert len(at_client) == 1 and isinstance(at_client[0], StreamReset)
    reset = at_client[0]
    assert (reset.stream_id, reset.error_code, reset.remote) == (big, ErrorCode.PROTOCOL_ERROR, False)
    assert reset.reason.startswith("header_too_large: response header list of ")
    assert (hbone.RST_STREAM, 0, big, struct.pack(">L", ErrorCode.PROTOCOL_ERROR)) in sent(client)
    assert not client.closed and not client.stream_is_open(big) and client.stream_is_open(busy)
    # the next response, made of references to the refused one's table entries, decodes right
    sid = client.send_connect("10.0.0.2:8080")
    exchange(client, server)
    later = [("x-h199", "v" * 100), ("x-h190", "v" * 100)]
    server.send_response(sid, 200, later)
    _, at_client = exchange(client, server)
    assert at_client == [ResponseReceived(sid, 200, later)]
    server.send_data(busy, b"still here")
    _, at_client = exchange(client, server)
    assert data_of(at_client, busy) == b"still here"


# ---------------------------------------------------------------------------------------- malformed responses


def client_with_stream() -> tuple[HboneConnection, int, Encoder]:
    """A client whose CONNECT is waiting for its answer, and the encoder of the (simulated) server."""
    client = HboneConnection(client=True)
    client.initiate()
    client.receive_data(settings_frame())
    sid = client.send_connect("10.0.0.2:8080")
    client.data_to_send()
    return client, sid, Encoder()


OK = (":status", "200")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("server", "envoy")], "no :status"),
        ([OK, (":status", "200")], "duplicate :status"),
        ([OK, (":method", "CONNECT")], ":method not allowed in a response"),
        ([OK, (":authority", "a:1")], ":authority not allowed in a response"),
        ([OK, (":path", "/")], ":path not allowed in a response"),
        ([OK, (":scheme", "https")], ":scheme not allowed in a response"),
        ([OK, (":protocol", "websocket")], ":protocol not allowed in a response"),
        ([OK, (":foo", "1")], ":foo not allowed in a response"),
        ([("server", "envoy"), OK], "pseudo-header after regular header"),
        ([(":status", "20")], "invalid :status '20'"),
        ([(":status", "2000")], "invalid :status '2000'"),
        ([(":status", "abc")], "invalid :status 'abc'"),
        ([(":status", "099")], "invalid :status '099'"),
        ([(":status", "")], "invalid :status ''"),
        ([(b":status", b"\xb2\xb3\xb9")], "invalid :status"),  # latin-1 superscripts: str.isdigit() is True
        ([(":status", "101")], ":status 101"),
        ([OK, ("Server", "envoy")], "invalid header name 'Server'"),
        ([OK, ("x y", "1")], "invalid header name 'x y'"),
        ([OK, ("x:y", "1")], "invalid header name 'x:y'"),
        ([OK, ("", "1")], "invalid header name ''"),
        ([OK, ("baggage", "a=1\r\nx-injected: 1")], "invalid value of baggage"),
        ([OK, ("baggage", "a=1\x00")], "invalid value of baggage"),
        ([OK, ("baggage", " a=1")], "invalid value of baggage"),
        ([OK, ("baggage", "a=1\t")], "invalid value of baggage"),
        ([(":status", "200 ")], "invalid value of :status"),
        ([OK, ("connection", "close")], "connection-specific header connection"),
        ([OK, ("keep-alive", "timeout=5")], "connection-specific header keep-alive"),
        ([OK, ("proxy-connection", "close")], "connection-specific header proxy-connection"),
        ([OK, ("transfer-encoding", "chunked")], "connection-specific header transfer-encoding"),
        ([OK, ("upgrade", "h2c")], "connection-specific header upgrade"),
        ([OK, ("te", "gzip")], "connection-specific header te"),
    ],
)
def test_malformed_response_is_a_stream_error(headers: list[tuple[str | bytes, str | bytes]], why: str) -> None:
    client, sid, enc = client_with_stream()
    other = client.send_connect("10.0.0.3:80")
    client.data_to_send()
    events = client.receive_data(frame(hbone.HEADERS, END_HEADERS, sid, enc.encode(headers)))
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    reset = events[0]
    assert (reset.stream_id, reset.error_code, reset.remote) == (sid, ErrorCode.PROTOCOL_ERROR, False)
    assert reset.reason.startswith("malformed_response: ") and why in reset.reason
    assert sent(client) == [(hbone.RST_STREAM, 0, sid, struct.pack(">L", ErrorCode.PROTOCOL_ERROR))]
    assert not client.closed and not client.stream_is_open(sid)
    # the other stream on the connection gets its answer as usual (and the HPACK context is intact)
    events = client.receive_data(frame(hbone.HEADERS, END_HEADERS, other, enc.encode([OK, ("server", "envoy")])))
    assert events == [ResponseReceived(other, 200, [("server", "envoy")])]


def test_informational_response_with_end_stream_is_a_stream_error() -> None:
    client, sid, enc = client_with_stream()
    events = client.receive_data(
        frame(hbone.HEADERS, END_HEADERS | hbone.FLAG_END_STREAM, sid, enc.encode([(":status", "100")]))
    )
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    assert events[0].reason == "malformed_response: informational response with END_STREAM"


def test_informational_response_is_skipped_and_the_final_one_delivered() -> None:
    client, sid, enc = client_with_stream()
    assert client.receive_data(frame(hbone.HEADERS, END_HEADERS, sid, enc.encode([(":status", "103")]))) == []
    events = client.receive_data(frame(hbone.HEADERS, END_HEADERS, sid, enc.encode([OK, ("te", "trailers")])))
    assert events == [ResponseReceived(sid, 200, [("te", "trailers")])]


def test_malformed_trailers_after_the_response_reset_the_stream() -> None:
    client, sid, enc = client_with_stream()
    assert client.receive_data(frame(hbone.HEADERS, END_HEADERS, sid, enc.encode([OK]))) == [
        ResponseReceived(sid, 200, [])
    ]
    events = client.receive_data(frame(hbone.HEADERS, END_HEADERS | hbone.FLAG_END_STREAM, sid, enc.encode([OK])))
    assert len(events) == 1 and isinstance(events[0], StreamReset)
    assert events[0].reason == "pseudo-header :status not allowed in a trailer" and not client.closed


def test_well_formed_trailers_end_the_stream() -> None:
    client, sid, enc = client_with_stream()
    client.receive_data(frame(hbone.HEADERS, END_HEADERS, sid, enc.encode([OK])))
    events = client.receive_data(
        frame(hbone.HEADERS, END_HEADERS | hbone.FLAG_END_STREAM, sid, enc.encode([("x-t", "1")]))
    )
    assert events == [StreamEnded(sid)]


NAMES = [":status", ":method", ":path", "server", "Server", "connection", "te", "x y", "", "date"]
VALUES = ["200", "404", "101", "099", "2000", "", " x", "x\r\n", "trailers", "envoy", "\xb2\xb3\xb9"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=6),
    end_stream=st.booleans(),
)
def test_any_response_header_list_is_an_answer_or_a_stream_error(
    headers: list[tuple[str, str]], end_stream: bool
) -> None:
    """Whatever the list, the connection survives: a final answer, an informational one (nothing yet), or a
    reset of that stream alone; and a delivered answer is well-formed."""
    client, sid, enc = client_with_stream()
    flags = END_HEADERS | (hbone.FLAG_END_STREAM if end_stream else 0)
    block = enc.encode([(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers])
    events = client.receive_data(frame(hbone.HEADERS, flags, sid, block))
    assert not client.closed and not any(isinstance(e, ConnectionTerminated) for e in events)
    kinds = [type(e) for e in events]
    assert kinds in ([], [ResponseReceived], [ResponseReceived, StreamEnded], [StreamReset])
    if kinds == [StreamReset]:
        assert events[0].reason.startswith("malformed_response: ")  # type: ignore[union-attr]
        return
    statuses = [v for n, v in headers if n == ":status"]
    assert len(statuses) == 1 and headers[0][0] == ":status"
    if not events:
        assert statuses[0].startswith("1") and not end_stream
        return
    response = events[0]
    assert isinstance(response, ResponseReceived) and str(response.status) == statuses[0]
    assert response.headers == headers[1:]
    assert all(n == n.lower() and n and " " not in n and n not in ("connection",) for n, _ in response.headers)
    assert all(v == v.strip() and "\r" not in v for _, v in response.headers)
