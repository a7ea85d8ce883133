"""The sans-IO HBONE HTTP/2 core driven with bytes only: client/server pairs in memory, no sockets."""

from __future__ import annotations

import itertools
import struct

import pytest
from hpack import Decoder, Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import hbone
from agent.hbone import (
    PREFACE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    HboneConnection,
    HboneSettings,
    PingAcked,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    StreamStateError,
    WindowOpened,
)

HDR = struct.Struct(">BHBBL")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    return frame(hbone.SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def pump(src: HboneConnection, dst: HboneConnection) -> list[hbone.Event]:
    events: list[hbone.Event] = []
    for chunk in src.data_to_send():
        events.extend(dst.receive_data(bytes(chunk)))
    return events


def exchange(client: HboneConnection, server: HboneConnection) -> tuple[list[hbone.Event], list[hbone.Event]]:
    """Pump both ways until quiet; returns (events seen by the server, events seen by the client)."""
    at_server: list[hbone.Event] = []
    at_client: list[hbone.Event] = []
    while client.has_output() or server.has_output():
        at_server += pump(client, server)
        at_client += pump(server, client)
    return at_server, at_client


def pair(
    client_settings: HboneSettings | None = None, server_settings: HboneSettings | None = None
) -> tuple[HboneConnection, HboneConnection]:
    client = HboneConnection(client=True, settings=client_settings)
    server = HboneConnection(client=False, settings=server_settings)
    client.initiate()
    server.initiate()
    exchange(client, server)
    return client, server


def data_of(events: list[hbone.Event], sid: int) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def open_tunnel(client: HboneConnection, server: HboneConnection, authority: str = "10.0.0.2:8080") -> int:
    sid = client.send_connect(authority, [("forwarded", 'for="10.0.0.1:4000"')])
    at_server, _ = exchange(client, server)
    assert [type(e) for e in at_server] == [RequestReceived]
    server.send_response(sid, 200)
    _, at_client = exchange(client, server)
    assert isinstance(at_client[0], ResponseReceived) and at_client[0].status == 200
    return sid


# ---------------------------------------------------------------------------------------------------- happy path


def test_connect_request_carries_authority_and_headers() -> None:
    client, server = pair()
    headers = [
        ("forwarded", 'for="10.0.0.1:4000"'),
        ("baggage", "k8s.namespace.name=default,k8s.deployment.name=client"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
    ]
    sid = client.send_connect("10.0.0.2:8080", headers)
    at_server, _ = exchange(client, server)
    assert at_server == [RequestReceived(sid, "10.0.0.2:8080", headers)]
    server.send_response(sid, 200, [("server", "ambit")])
    _, at_client = exchange(client, server)
    assert at_client == [ResponseReceived(sid, 200, [("server", "ambit")])]


def test_data_both_ways_and_half_close() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    assert client.send_data(sid, b"ping" * 1000) == 4000
    client.end_stream(sid)
    at_server, _ = exchange(client, server)
    assert data_of(at_server, sid) == b"ping" * 1000
    assert isinstance(at_server[-1], StreamEnded)
    # half-closed: the server can still answer, and the stream is gone once both ends closed
    assert server.send_data(sid, b"pong", end_stream=True) == 4
    _, at_client = exchange(client, server)
    assert data_of(at_client, sid) == b"pong"
    assert isinstance(at_client[-1], StreamEnded)
    assert not client.stream_is_open(sid) and not server.stream_is_open(sid)
    assert client.open_streams == 0 and server.open_streams == 0


def test_large_write_uses_peer_frame_size_and_zero_copy_pairs() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    payload = bytes(range(256)) * 8192  # 2 MiB
    assert client.send_data(sid, payload) == len(payload)
    out = client.data_to_send()
    # 1 MiB frames as (9-byte header, payload view) pairs: nothing joined, nothing copied
    assert [len(x) for x in out] == [9, 1024 * 1024, 9, 1024 * 1024]
    assert isinstance(out[1], memoryview) and out[1].obj is payload
    events = []
    for chunk in out:
        events += server.receive_data(bytes(chunk))
    assert data_of(events, sid) == payload


def test_small_peer_frame_size_is_respected() -> None:
    client = HboneConnection(client=True)
    client.initiate()
    client.data_to_send()
    client.receive_data(settings_frame())  # peer keeps the 16 KiB default
    sid = client.send_connect("10.0.0.2:80")
    client.data_to_send()
    client.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS, sid, Encoder().encode([(":status", "200")])))
    assert client.send_data(sid, b"x" * 40000) == 40000
    wire = b"".join(bytes(x) for x in client.data_to_send())
    sizes = []
    pos = 0
    while pos < len(wire):
        hi, lo, ftype, _flags, _sid = HDR.unpack_from(wire, pos)
        n = (hi << 16) | lo
        if ftype == hbone.DATA:
            sizes.append(n)
        pos += 9 + n
    assert sizes == [16384, 16384, 7232]


# ---------------------------------------------------------------------------------------------------- splitting


def _scripted_client_bytes() -> tuple[bytes, int, bytes]:
    """A whole client conversation as raw bytes, including padded DATA and a CONTINUATION-split header block."""
    client = HboneConnection(client=True)
    client.initiate()
    wire = b"".join(bytes(x) for x in client.data_to_send())
    enc = Encoder()
    block = enc.encode([(":method", "CONNECT"), (":authority", "10.0.0.9:443"), ("baggage", "a=" + "b" * 300)])
    wire += frame(hbone.HEADERS, 0, 1, block[:10])
    wire += frame(hbone.CONTINUATION, 0, 1, block[10:100])
    wire += frame(hbone.CONTINUATION, hbone.FLAG_END_HEADERS, 1, block[100:])
    body = bytes(range(251)) * 40
    wire += frame(hbone.DATA, hbone.FLAG_PADDED, 1, bytes([7]) + body[:5000] + b"\0" * 7)
    wire += frame(hbone.PING, 0, 0, b"12345678")
    wire += frame(hbone.PRIORITY, 0, 1, b"\0\0\0\0\x10")
    wire += frame(0xEE, 0, 0, b"unknown frame type is ignored")
    wire += frame(hbone.DATA, hbone.FLAG_END_STREAM, 1, body[5000:])
    return wire, 1, body


def _normalise(events: list[hbone.Event]) -> list[object]:
    """Events with DataReceived merged, so different chunkings compare equal."""
    out: list[object] = []
    for e in events:
        if isinstance(e, DataReceived):
            if out and isinstance(out[-1], tuple) and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1], out[-1][2] + bytes(e.data))
            else:
                out.append(("data", e.stream_id, bytes(e.data)))
        else:
            out.append(e)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=40))
def test_arbitrary_split_points_give_the_same_events(cuts: list[int]) -> None:
    wire, sid, body = _scripted_client_bytes()
    whole = HboneConnection(client=False)
    whole.initiate()
    expected = _normalise(whole.receive_data(wire))
    assert ("data", sid, body) in expected
    assert any(isinstance(e, RequestReceived) and e.authority == "10.0.0.9:443" for e in expected)

    split = HboneConnection(client=False)
    split.initiate()
    events: list[hbone.Event] = []
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in itertools.pairwise(points):
        events += split.receive_data(memoryview(wire)[a:b])
    assert _normalise(events) == expected
    assert b"".join(bytes(x) for x in split.data_to_send()) == b"".join(bytes(x) for x in whole.data_to_send())


def test_data_events_are_views_not_copies() -> None:
    wire, _sid, _body = _scripted_client_bytes()
    server = HboneConnection(client=False)
    buf = memoryview(bytearray(wire))
    events = server.receive_data(buf)
    views = [e.data for e in events if isinstance(e, DataReceived)]
    assert views and all(v.obj is buf.obj for v in views)


# ---------------------------------------------------------------------------------------------------- flow control


def test_two_hundred_streams_complete_without_stalling() -> None:
    client, server = pair()
    n_streams, size = 200, 1024 * 1024 + 17
    sids = [client.send_connect(f"10.0.{i // 250}.{i % 250 + 1}:80") for i in range(n_streams)]
    at_server, _ = exchange(client, server)
    assert len([e for e in at_server if isinstance(e, RequestReceived)]) == n_streams
    for sid in sids:
        server.send_response(sid, 200)
    exchange(client, server)
    payload = {sid: bytes([sid % 251]) * size for sid in sids}
    sent = dict.fromkeys(sids, 0)
    got: dict[int, int] = dict.fromkeys(sids, 0)
    ended: set[int] = set()
    for _round in range(10000):
        progress = False
        for sid in sids:
            if sent[sid] < size and client.send_window(sid) > 0:
                n = client.send_data(sid, memoryview(payload[sid])[sent[sid] :], end_stream=True)
                sent[sid] += n
                progress = progress or n > 0
        at_server = pump(client, server)
        for e in at_server:
            if isinstance(e, DataReceived):
                assert bytes(e.data) == payload[e.stream_id][got[e.stream_id] : got[e.stream_id] + len(e.data)]
                got[e.stream_id] += len(e.data)
                server.acknowledge(e.stream_id, len(e.data))  # the consumer reads everything
                progress = True
            elif isinstance(e, StreamEnded):
                ended.add(e.stream_id)
        pump(server, client)
        if len(ended) == n_streams:
            break
        assert progress, f"stalled: {sum(got.values())} of {n_streams * size} bytes delivered"
    assert ended == set(sids)
    assert all(got[s] == size for s in sids)


def test_stream_that_never_reads_does_not_block_others() -> None:
    client, server = pair()
    stuck = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    # The stuck stream fills its whole 4 MiB window; the server never acknowledges any of it.
    window = client.send_window(stuck)
    assert client.send_data(stuck, b"s" * (window + 1000)) == window
    assert client.send_window(stuck) == 0
    exchange(client, server)
    # 20 MiB (more than the 16 MiB connection window) still flows on the other stream.
    total = 0
    for _ in range(1000):
        n = client.send_data(other, b"o" * (1024 * 1024))
        at_server = pump(client, server)
        for e in at_server:
            if isinstance(e, DataReceived) and e.stream_id == other:
                total += len(e.data)
                server.acknowledge(other, len(e.data))
        pump(server, client)
        if total >= 20 * 1024 * 1024:
            break
        assert n or client.send_window(other), "other stream stalled behind the stuck one"
    assert total >= 20 * 1024 * 1024


def test_credit_is_returned_only_when_acknowledged() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    window = client.send_window(sid)
    assert client.send_data(sid, b"a" * window) == window
    _at_server, at_client = exchange(client, server)
    assert client.send_window(sid) == 0
    assert not any(isinstance(e, WindowOpened) and e.stream_id == sid for e in at_client)
    server.acknowledge(sid, window)
    _, at_client = exchange(client, server)
    assert WindowOpened(sid) in at_client
    assert client.send_window(sid) == window


def test_held_connection_credit_is_returned_on_release() -> None:
    """While the caller holds connection credit (its relays keep too much), received DATA returns none; the
    release returns all of it, and other streams move again."""
    window = 65535 * 4
    client, server = pair(server_settings=HboneSettings(connection_window=window, stream_window=window))
    first = open_tunnel(client, server)
    second = open_tunnel(client, server, "10.0.0.3:80")
    server.hold_connection_credit(True)
    assert server.connection_credit_held
    assert client.send_data(first, b"h" * window) == window
    at_server, _ = exchange(client, server)
    assert len(data_of(at_server, first)) == window
    assert client.send_data(second, b"x") == 0, "the connection window is spent and nothing came back"
    server.hold_connection_credit(False)
    exchange(client, server)
    assert client.send_data(second, b"x" * 1000) == 1000
    server.hold_connection_credit(False)  # idempotent: nothing more to return
    assert not server.has_output()


def test_data_beyond_stream_window_resets_that_stream_only() -> None:
    client, server = pair(server_settings=HboneSettings(stream_window=65535))
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    # Forge an over-window DATA frame (a well-behaved client cannot produce it).
    events = server.receive_data(frame(hbone.DATA, 0, sid, b"x" * 70000))
    assert StreamReset(sid, ErrorCode.FLOW_CONTROL_ERROR, False, "DATA beyond the stream window") in events
    assert server.stream_is_open(other) and not server.closed


def test_data_before_the_response_resets_that_stream_only() -> None:
    client, server = pair()
    sid = client.send_connect("10.0.0.2:8080")
    exchange(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    with pytest.raises(StreamStateError):  # the server core refuses to produce it ...
        server.send_data(sid, b"early answer")
    events = client.receive_data(frame(hbone.DATA, 0, sid, b"early answer"))  # ... so it is forged here
    assert StreamReset(sid, ErrorCode.PROTOCOL_ERROR, False, "DATA before the response") in events
    assert not any(isinstance(e, DataReceived) for e in events)
    assert client.stream_is_open(other) and not client.closed


def test_window_update_zero_and_overflow_are_errors() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    events = client.receive_data(frame(hbone.WINDOW_UPDATE, 0, sid, struct.pack(">L", 0)))
    assert any(isinstance(e, StreamReset) and e.error_code == ErrorCode.PROTOCOL_ERROR for e in events)
    events = client.receive_data(frame(hbone.WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.FLOW_CONTROL_ERROR


def test_reset_streams_do_not_leak_connection_window() -> None:
    client, server = pair(server_settings=HboneSettings(connection_window=65535 * 4))
    for i in range(20):
        sid = open_tunnel(client, server, f"10.0.0.{i + 1}:80")
        client.send_data(sid, b"z" * 60000)
        server.reset_stream(sid, ErrorCode.CANCEL)  # dropped before anyone read: credit must still come back
        exchange(client, server)
    last = open_tunnel(client, server, "10.0.1.1:80")
    assert client.send_window(last) > 60000


def test_data_before_the_answer_holds_its_connection_credit_until_the_answer() -> None:
    client, server = pair(server_settings=HboneSettings(connection_window=65535))
    sid = client.send_connect("10.0.0.2:8080")
    probe = client.send_connect("10.0.0.3:80")  # shows the client's connection window
    assert client.send_data(sid, b"e" * 30000) == 30000
    at_server, _ = exchange(client, server)
    assert data_of(at_server, sid) == b"e" * 30000  # delivered (the caller buffers it) ...
    assert client.send_window(probe) == 65535 - 30000  # ... but its connection credit is held
    server.send_response(sid, 200)
    exchange(client, server)
    assert client.send_window(probe) == 65535


def test_unanswered_streams_cannot_park_more_than_the_connection_window() -> None:
    """A peer that fills stream after stream the server has not answered (its upstream connect hanging) gets
    one connection window in all, not a stream window per stream."""
    client, server = pair(server_settings=HboneSettings(connection_window=65535, stream_window=65535))
    sent = 0
    for i in range(4):
        sid = client.send_connect(f"10.0.0.{i + 1}:80")
        sent += client.send_data(sid, b"p" * 65535)
        exchange(client, server)
    assert sent == 65535
    # A peer ignoring the window is a connection error, not more memory.
    events = server.receive_data(frame(hbone.DATA, 0, 1, b"x"))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.FLOW_CONTROL_ERROR


def test_refusing_an_unanswered_stream_returns_its_held_credit() -> None:
    client, server = pair(server_settings=HboneSettings(connection_window=65535))
    for i in range(10):  # each would otherwise keep 60000 of the 65535
        sid = client.send_connect(f"10.0.0.{i + 1}:80")
        assert client.send_data(sid, b"r" * 60000) == 60000
        exchange(client, server)
        if i % 2:
            server.send_response(sid, 503)
        else:
            server.reset_stream(sid, ErrorCode.REFUSED_STREAM)
        exchange(client, server)
    assert client.send_window(client.send_connect("10.0.1.1:80")) == 65535


def test_peer_reset_of_an_unanswered_stream_returns_its_held_credit() -> None:
    client, server = pair(server_settings=HboneSettings(connection_window=65535))
    for i in range(10):
        sid = client.send_connect(f"10.0.0.{i + 1}:80")
        assert client.send_data(sid, b"c" * 60000) == 60000
        client.reset_stream(sid, ErrorCode.CANCEL)
        exchange(client, server)
    assert client.send_window(client.send_connect("10.0.1.1:80")) == 65535


def test_padded_data_is_stripped_and_its_credit_returned() -> None:
    client, server = pair(server_settings=HboneSettings(stream_window=65535 * 2))
    sid = open_tunnel(client, server)
    for _ in range(3):
        events = server.receive_data(frame(hbone.DATA, hbone.FLAG_PADDED, sid, bytes([200]) + b"abc" + b"\0" * 200))
        assert data_of(events, sid) == b"abc"
    server.acknowledge(sid, 9)
    _, _at_client = exchange(client, server)
    # 3 * 204 bytes of flow-controlled payload, all of it credited back (padding immediately, data on ack)
    assert client.send_window(sid) == client.peer_initial_window


# ---------------------------------------------------------------------------------------------------- bad input


def test_non_connect_request_gets_400() -> None:
    _client, server = pair()
    block = Encoder().encode([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")])
    events = server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS | hbone.FLAG_END_STREAM, 1, block))
    assert len(events) == 1 and isinstance(events[0], RequestRejected)
    assert events[0].status == 400 and events[0].reason.startswith("bad_request")
    assert not server.closed
    # on the wire: HEADERS(:status 400, END_STREAM) for stream 1
    wire = b"".join(bytes(x) for x in server.data_to_send())
    hi, lo, ftype, flags, sid = HDR.unpack_from(wire, 0)
    assert (ftype, sid) == (hbone.HEADERS, 1) and flags & hbone.FLAG_END_STREAM
    assert Decoder().decode(wire[9 : 9 + ((hi << 16) | lo)]) == [(":status", "400")]


@pytest.mark.parametrize(
    "headers",
    [
        [(":method", "CONNECT")],  # no authority
        [(":method", "CONNECT"), (":authority", "a:1"), (":path", "/")],  # extended/odd CONNECT
        [(":method", "CONNECT"), (":authority", "a:1"), ("Upper", "x")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("connection", "close")],
        [(":method", "CONNECT"), ("x", "1"), (":authority", "a:1")],  # pseudo after regular
        # RFC 9113 8.2.1: names are lowercase tokens; values carry no NUL/CR/LF and no whitespace at either end
        [(":method", "CONNECT"), (":authority", "a:1"), ("forwarded", 'for="1.2.3.4"\r\nx-injected: 1')],
        [(":method", "CONNECT"), (":authority", "a:1"), ("baggage", "a=1\x00")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("baggage", " a=1")],
        [(":method", "CONNECT"), (":authority", "a:1 ")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("baggage", "a=1\t")],
        [(":method", "CONNECT"), (":authority", "\ta:1")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("forwarded", "x\ry")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("forwarded", "x\ny")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("x y", "1")],
        [(":method", "CONNECT"), (":authority", "a:1"), ("x:y", "1")],
    ],
)
def test_malformed_connect_gets_400(headers: list[tuple[str, str]]) -> None:
    _client, server = pair()
    events = server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS, 1, Encoder().encode(headers)))
    assert [type(e) for e in events] == [RequestRejected]
    assert events[0].status == 400  # type: ignore[union-attr]
    assert not server.closed


def test_garbage_instead_of_preface_is_a_connection_error() -> None:
    server = HboneConnection(client=False)
    server.initiate()
    server.data_to_send()
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(events) == 1 and isinstance(events[0], ConnectionTerminated)
    assert events[0].error_code == ErrorCode.PROTOCOL_ERROR and not events[0].remote
    wire = b"".join(bytes(x) for x in server.data_to_send())
    assert wire[3] == hbone.GOAWAY
    assert server.receive_data(b"more garbage") == []  # dead connections ignore input


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=2000), role_client=st.booleans())
def test_random_bytes_never_raise(garbage: bytes, role_client: bool) -> None:
    conn = HboneConnection(client=role_client)
    conn.initiate()
    prefix = b"" if role_client else PREFACE
    events = conn.receive_data(prefix + settings_frame() + garbage)
    conn.data_to_send()
    for e in events:
        assert not isinstance(e, DataReceived) or len(e.data) <= len(garbage)


def test_continuation_flood_is_refused() -> None:
    _client, server = pair()
    wire = frame(hbone.HEADERS, 0, 1, b"")
    wire += frame(hbone.CONTINUATION, 0, 1, b"") * 100
    events = server.receive_data(wire)
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_interleaved_frame_during_continuation_is_a_protocol_error() -> None:
    _client, server = pair()
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "a:1")])
    wire = frame(hbone.HEADERS, 0, 1, block[:3]) + frame(hbone.PING, 0, 0, b"12345678")
    events = server.receive_data(wire)
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR


def test_continuation_without_headers_is_a_protocol_error() -> None:
    _client, server = pair()
    events = server.receive_data(frame(hbone.CONTINUATION, hbone.FLAG_END_HEADERS, 1, b""))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR


def test_oversized_frame_is_a_frame_size_error() -> None:
    _client, server = pair(server_settings=HboneSettings(max_frame_size=16384))
    events = server.receive_data(frame(hbone.DATA, 0, 1, b"x" * 16385))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.FRAME_SIZE_ERROR


def test_stream_id_going_backwards_is_a_protocol_error() -> None:
    _client, server = pair()
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "a:1")])
    server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS, 5, block))
    events = server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS, 3, block))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR


def test_too_many_concurrent_streams_are_refused() -> None:
    client, server = pair(server_settings=HboneSettings(max_concurrent_streams=2))
    assert client.peer_max_concurrent_streams == 2
    enc = Encoder()
    events: list[hbone.Event] = []
    for sid in (1, 3, 5):
        block = enc.encode([(":method", "CONNECT"), (":authority", f"a:{sid}")])
        events += server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS, sid, block))
    assert [type(e) for e in events] == [RequestReceived, RequestReceived, RequestRejected]
    assert events[2].reason == "refused_stream"  # type: ignore[union-attr]
    assert client.available_streams == 2
    client.send_connect("a:1")
    client.send_connect("a:2")
    with pytest.raises(StreamStateError):
        client.send_connect("a:3")


def test_push_promise_is_refused() -> None:
    client, _server = pair()
    events = client.receive_data(frame(hbone.PUSH_PROMISE, hbone.FLAG_END_HEADERS, 1, b"\0\0\0\2"))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR


def test_invalid_settings_are_connection_errors() -> None:
    for bad in (settings_frame((hbone.S_MAX_FRAME_SIZE, 100)), settings_frame((hbone.S_ENABLE_PUSH, 2))):
        client, _server = pair()
        events = client.receive_data(bad)
        assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR
    client, _server = pair()
    events = client.receive_data(frame(hbone.SETTINGS, 0, 0, b"\0\0\0"))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.FRAME_SIZE_ERROR


def test_initial_window_change_applies_to_open_streams() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    before = client.send_window(sid)
    events = client.receive_data(settings_frame((hbone.S_INITIAL_WINDOW_SIZE, 8 * 1024 * 1024)))
    assert WindowOpened(0) in events
    assert client.send_window(sid) == before + 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------- control


def test_ping_is_acknowledged_with_the_same_payload() -> None:
    client, server = pair()
    client.ping(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    _, at_client = exchange(client, server)
    assert at_client == [PingAcked(b"\x01\x02\x03\x04\x05\x06\x07\x08")]
    with pytest.raises(ValueError):
        client.ping(b"short")


def test_goaway_refuses_streams_the_peer_never_processed() -> None:
    client, server = pair()
    first = open_tunnel(client, server)
    server.goaway()
    late = client.send_connect("10.0.0.7:80")  # crosses the GOAWAY on the wire
    at_server, at_client = exchange(client, server)
    assert RequestRejected(late, 0, "refused_stream") in at_server
    term = [e for e in at_client if isinstance(e, ConnectionTerminated)]
    assert term == [ConnectionTerminated(ErrorCode.NO_ERROR, first, True, "")]
    assert StreamReset(late, ErrorCode.REFUSED_STREAM, True, "GOAWAY before processing") in at_client
    assert client.stream_is_open(first) and client.available_streams == 0
    # the stream opened before the GOAWAY keeps working
    client.send_data(first, b"still here", end_stream=True)
    at_server, _ = exchange(client, server)
    assert data_of(at_server, first) == b"still here"


def test_peer_reset_is_reported_and_late_data_ignored() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    events = server.receive_data(frame(hbone.RST_STREAM, 0, sid, struct.pack(">L", ErrorCode.CANCEL)))
    assert events == [StreamReset(sid, ErrorCode.CANCEL, True, "peer reset: CANCEL")]
    assert server.receive_data(frame(hbone.DATA, 0, sid, b"late")) == []
    with pytest.raises(StreamStateError):
        server.send_data(sid, b"x")


def test_non_200_response_ends_the_stream() -> None:
    client, server = pair()
    sid = client.send_connect("10.0.0.2:80")
    exchange(client, server)
    server.send_response(sid, 401)
    assert not server.stream_is_open(sid)
    _, at_client = exchange(client, server)
    assert ResponseReceived(sid, 401, []) in at_client and StreamEnded(sid) in at_client


def test_single_data_frame_latency_path() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    client.send_data(sid, b"one")
    wire = memoryview(b"".join(bytes(x) for x in client.data_to_send()))
    assert server.receive_single_data(wire[:5]) is None  # partial: nothing consumed
    got = server.receive_single_data(wire)
    assert got is not None and got[0] == sid and bytes(got[1]) == b"one" and not got[2]
    # two frames in one buffer: not the single-frame case, and nothing is consumed by the attempt
    client.send_data(sid, b"two")
    client.send_data(sid, b"three", end_stream=True)
    wire = memoryview(b"".join(bytes(x) for x in client.data_to_send()))
    assert server.receive_single_data(wire) is None
    events = server.receive_data(wire)
    assert data_of(events, sid) == b"twothree" and StreamEnded(sid) in events


def test_data_frame_latency_path_accounts_windows_and_refuses_what_send_data_would_split() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    before = client.send_window(sid)
    frame_bytes = client.data_frame(sid, memoryview(b"ping"))
    assert frame_bytes is not None and client.send_window(sid) == before - 4
    assert not client.has_output()  # returned to the caller, not queued
    events = server.receive_data(frame_bytes)
    assert data_of(events, sid) == b"ping"
    # Nothing the fast path cannot do whole: empty, too big for one copied frame, beyond the window, unknown.
    assert client.data_frame(sid, b"") is None
    assert client.data_frame(sid, b"x" * (hbone.SMALL_FRAME + 1)) is None
    assert client.data_frame(sid + 2, b"x") is None
    client.send_data(sid, b"y" * (client.send_window(sid) - 1))
    assert client.data_frame(sid, b"ab") is None and client.send_window(sid) == 1
    client.end_stream(sid)
    assert client.data_frame(sid, b"z") is None  # closed for sending


def test_data_frame_is_refused_on_a_stream_the_server_has_not_answered() -> None:
    client, server = pair()
    sid = client.send_connect("10.0.0.2:8080")
    exchange(client, server)
    assert server.data_frame(sid, b"early") is None
    server.send_response(sid, 200)
    assert server.data_frame(sid, b"late") is None  # its HEADERS are queued: they go first, in one write with it
    assert server.send_data(sid, b"late") == 4
    wire = b"".join(bytes(p) for p in server.data_to_send())
    assert server.data_frame(sid, b"later") is not None
    events = client.receive_data(wire)
    assert [type(e) for e in events if type(e) in (ResponseReceived, DataReceived)] == [ResponseReceived, DataReceived]


def test_single_frames_return_connection_credit_a_quarter_window_at_a_time() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    window = server.settings.connection_window
    chunk = hbone.SMALL_FRAME
    sent = 0
    while sent + chunk < window // 4:
        got = server.receive_single_data(memoryview(client.data_frame(sid, b"c" * chunk) or b""))
        assert got is not None
        server.acknowledge(sid, chunk)
        sent += chunk
        client.receive_data(b"".join(bytes(x) for x in server.data_to_send()))  # stream credit only so far
    assert client.send_window(sid) > 0
    conn_before = client._conn_send_window
    got = server.receive_single_data(memoryview(client.data_frame(sid, b"c" * chunk) or b""))
    assert got is not None
    events = client.receive_data(b"".join(bytes(x) for x in server.data_to_send()))
    assert WindowOpened(0) in events and client._conn_send_window > conn_before


def test_an_internal_bug_costs_one_connection_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    _client, server = pair()

    def broken(self: HboneConnection, payload: memoryview, events: list[hbone.Event]) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(HboneConnection, "_on_frame", broken)
    events = server.receive_data(frame(hbone.PING, 0, 0, b"12345678"))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.INTERNAL_ERROR
    assert server.closed


def test_per_stream_headers_are_never_indexed_and_repeated_ones_are() -> None:
    """forwarded/traceparent differ on every stream: sent as never-indexed literals they leave both dynamic tables
    alone, while the repeated :method, :authority and baggage become one-byte references after the first stream."""
    client, server = pair()
    bag = "k8s.namespace.name=default,k8s.deployment.name=client"
    blocks = []
    for i in range(40):
        headers = [
            ("forwarded", f'for="10.0.0.1:{4000 + i}"'),
            ("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-00"),
            ("baggage", bag),
        ]
        sid = client.send_connect("10.0.0.2:8080", headers)
        [wire] = [bytes(c) for c in client.data_to_send()]
        blocks.append(wire[9:])  # the HEADERS payload (END_HEADERS, no padding or priority)
        at_server = server.receive_data(wire)
        assert at_server == [RequestReceived(sid, "10.0.0.2:8080", headers)]
        client.reset_stream(sid)
        exchange(client, server)
    dynamic = {(n.decode(), v.decode()) for n, v in client._encoder.hpack.header_table.dynamic_entries}
    assert dynamic == {(":method", "CONNECT"), (":authority", "10.0.0.2:8080"), ("baggage", bag)}
    assert len(blocks[-1]) < len(blocks[0]) - len(bag)  # baggage and authority sent by index after the first
    for name in (b"forwarded", b"traceparent"):
        assert name in blocks[-1] and blocks[-1][blocks[-1].index(name) - 2] == 0x10  # never indexed, new name


# ---------------------------------------------------------------------------------------------------- review fixes


def test_oversized_data_on_an_open_stream_is_a_frame_size_error() -> None:
    """A DATA frame longer than our SETTINGS_MAX_FRAME_SIZE is a connection FRAME_SIZE_ERROR (RFC 9113 4.2) even
    when it is whole, unpadded and within the windows (the single-frame fast path)."""
    for single in (False, True):
        client, server = pair(server_settings=HboneSettings(max_frame_size=16384))
        sid = open_tunnel(client, server)
        wire = memoryview(frame(hbone.DATA, 0, sid, b"x" * 16385))
        if single:
            got = server.receive_single_data(wire)
            assert got is None, "the fast path accepted an oversized frame"
        events = server.receive_data(wire)
        assert not any(isinstance(e, DataReceived) for e in events)
        assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.FRAME_SIZE_ERROR


def test_exhausted_stream_ids_leave_no_stream_capacity() -> None:
    """After the last client stream id (2^31-1) the connection can open nothing more (RFC 9113 5.1.1): it must
    say so, so that a pool opens a new connection instead of choosing this one again and again."""
    client, server = pair()
    client._next_stream_id = hbone.MAX_STREAM_ID
    last = client.send_connect("10.0.0.2:80")
    assert last == hbone.MAX_STREAM_ID
    assert client.available_streams == 0
    with pytest.raises(StreamStateError):
        client.send_connect("10.0.0.2:80")
    at_server, _ = exchange(client, server)
    assert [type(e) for e in at_server] == [RequestReceived]


def test_headers_on_a_stream_the_server_reset_are_ignored() -> None:
    """Frames the peer sent before it saw our RST_STREAM must be ignored (RFC 9113 5.1), HEADERS included (a
    trailer block): not a connection error that kills every other stream. The block is still decoded, so the
    HPACK table stays in sync."""
    client, server = pair()
    sid = open_tunnel(client, server)
    other = open_tunnel(client, server, "10.0.0.3:80")
    server.reset_stream(sid, ErrorCode.CANCEL)  # crosses the client's trailers on the wire
    enc = Encoder()
    trailers = enc.encode([("x-trailer", "t")])
    events = server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS | hbone.FLAG_END_STREAM, sid, trailers))
    assert events == [] and not server.closed
    assert server.stream_is_open(other)
    # the dynamic table entry the trailer block added is there for later blocks
    again = enc.encode([("x-trailer", "t")])
    events = server.receive_data(frame(hbone.HEADERS, hbone.FLAG_END_HEADERS | hbone.FLAG_END_STREAM, sid, again))
    assert events == [] and not server.closed


def test_data_between_headers_and_continuation_is_a_protocol_error_on_the_fast_path_too() -> None:
    client, server = pair()
    sid = open_tunnel(client, server)
    block = Encoder().encode([(":method", "CONNECT"), (":authority", "a:1")])
    assert server.receive_data(frame(hbone.HEADERS, 0, sid + 2, block[:3])) == []
    wire = memoryview(frame(hbone.DATA, 0, sid, b"x"))
    assert server.receive_single_data(wire) is None
    events = server.receive_data(wire)
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR


def test_initial_window_decrease_can_make_a_send_window_negative() -> None:
    """RFC 9113 6.9.2: a smaller SETTINGS_INITIAL_WINDOW_SIZE can leave an open stream's send window negative;
    nothing is sent until WINDOW_UPDATEs bring it above zero again."""
    client, server = pair(server_settings=HboneSettings(stream_window=65535))
    sid = open_tunnel(client, server)
    assert client.send_data(sid, b"w" * 60000) == 60000
    client.data_to_send()  # never delivered: the server has not credited anything yet
    client.receive_data(settings_frame((hbone.S_INITIAL_WINDOW_SIZE, 16384)))
    assert client.send_window(sid) == 0 and client.send_data(sid, b"x") == 0  # 16384 - 60000 < 0
    client.receive_data(frame(hbone.WINDOW_UPDATE, 0, sid, struct.pack(">L", 60000 - 16384)))
    assert client.send_data(sid, b"x") == 0  # back to exactly zero
    client.receive_data(frame(hbone.WINDOW_UPDATE, 0, sid, struct.pack(">L", 10)))
    assert client.send_window(sid) == 10


def test_a_server_enabling_push_is_a_protocol_error() -> None:
    """RFC 9113 6.5.2: a client MUST treat SETTINGS_ENABLE_PUSH = 1 from a server as a PROTOCOL_ERROR."""
    client, server = pair()
    events = client.receive_data(settings_frame((hbone.S_ENABLE_PUSH, 1)))
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == ErrorCode.PROTOCOL_ERROR
    # a client announcing 1 is only saying it would accept pushes: fine
    server.receive_data(settings_frame((hbone.S_ENABLE_PUSH, 1)))
    assert not server.closed
