"""What HboneConnection.data_to_send hands to ``transport.writelines``: small parts joined (one SSL_write, so one
TLS record, instead of one per part), big payload views passed on uncopied, and the wire bytes unchanged."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import hbone
from agent.hbone import COALESCE_LIMIT, DataReceived, HboneConnection, HboneSettings

HDR = struct.Struct(">BHBBL")
MiB = 1024 * 1024


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def data_frames(sid: int, payload: bytes, fsize: int, end_stream: bool = False) -> bytes:
    """DATA frames for ``payload`` split at the peer's frame size, built independently of agent.hbone."""
    out = b""
    for pos in range(0, len(payload), fsize):
        chunk = payload[pos : pos + fsize]
        last = pos + len(chunk) == len(payload)
        out += frame(hbone.DATA, hbone.FLAG_END_STREAM if end_stream and last else 0, sid, chunk)
    return out


def pump(src: HboneConnection, dst: HboneConnection) -> list[hbone.Event]:
    events: list[hbone.Event] = []
    for part in src.data_to_send():
        events += dst.receive_data(bytes(part))
    return events


def tunnel(peer_frame_size: int = MiB) -> tuple[HboneConnection, HboneConnection, int]:
    """A client with an open CONNECT stream to a server advertising ``peer_frame_size``; nothing left queued."""
    client = HboneConnection(client=True)
    server = HboneConnection(client=False, settings=HboneSettings(max_frame_size=peer_frame_size))
    client.initiate()
    server.initiate()
    sid = client.send_connect("10.0.0.2:8080")
    while client.has_output() or server.has_output():
        pump(client, server)
        pump(server, client)
    server.send_response(sid, 200)
    pump(server, client)
    assert client.peer_max_frame_size == peer_frame_size
    assert not client.has_output()
    return client, server, sid


def received(server: HboneConnection, parts: list[bytes | memoryview], sid: int) -> bytes:
    events: list[hbone.Event] = []
    for part in parts:
        events += server.receive_data(bytes(part))
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_one_byte_write_is_one_part() -> None:
    client, server, sid = tunnel()
    assert client.send_data(sid, memoryview(b"x")) == 1
    out = client.data_to_send()
    assert len(out) == 1
    assert bytes(out[0]) == frame(hbone.DATA, 0, sid, b"x")
    assert received(server, out, sid) == b"x"


def test_small_frames_and_control_frames_come_out_as_one_part() -> None:
    client, server, sid = tunnel()
    client.ping(b"12345678")
    client.send_data(sid, b"a" * 100)
    client.send_data(sid, memoryview(b"b" * 5000))
    client.send_data(sid, b"c" * COALESCE_LIMIT, end_stream=True)
    out = client.data_to_send()
    expected = (
        frame(hbone.PING, 0, 0, b"12345678")
        + frame(hbone.DATA, 0, sid, b"a" * 100)
        + frame(hbone.DATA, 0, sid, b"b" * 5000)
        + frame(hbone.DATA, hbone.FLAG_END_STREAM, sid, b"c" * COALESCE_LIMIT)
    )
    assert len(out) == 1
    assert isinstance(out[0], bytes) and out[0] == expected
    assert received(server, out, sid) == b"a" * 100 + b"b" * 5000 + b"c" * COALESCE_LIMIT


def test_small_peer_frames_of_one_big_write_are_one_part() -> None:
    # An Envoy peer keeps 16 KiB frames: 40000 bytes are three DATA frames, joined into one buffer.
    client, server, sid = tunnel(peer_frame_size=16384)
    payload = bytes(range(256)) * 157
    assert client.send_data(sid, payload) == len(payload)
    out = client.data_to_send()
    assert len(out) == 1
    assert bytes(out[0]) == data_frames(sid, payload, 16384)
    assert received(server, out, sid) == payload


def test_big_payload_views_are_not_copied() -> None:
    client, server, sid = tunnel()
    payload = bytearray(bytes(range(256)) * 1024)  # 256 KiB: one frame
    client.ping(b"pingpong")
    assert client.send_data(sid, memoryview(payload)) == len(payload)
    client.ping(b"87654321")
    out = client.data_to_send()
    # The PING before joins the DATA header; the one after is its own part: one extra small part per big frame.
    assert [len(x) for x in out] == [17 + 9, len(payload), 17]
    view = out[1]
    assert isinstance(view, memoryview) and view.obj is payload
    payload[0] ^= 0xFF  # the very same memory: the change shows through the view
    assert view[0] == payload[0]
    payload[0] ^= 0xFF
    expected = frame(hbone.PING, 0, 0, b"pingpong") + data_frames(sid, bytes(payload), MiB)
    assert b"".join(bytes(x) for x in out) == expected + frame(hbone.PING, 0, 0, b"87654321")
    assert received(server, out, sid) == payload


def test_medium_payload_is_zero_copy_too() -> None:
    # Just above the limit: a view of the caller's buffer, not a copy joined with its header.
    client, _server, sid = tunnel()
    payload = bytearray(COALESCE_LIMIT + 1)
    client.send_data(sid, memoryview(payload))
    out = client.data_to_send()
    assert [len(x) for x in out] == [9, COALESCE_LIMIT + 1]
    assert isinstance(out[1], memoryview) and out[1].obj is payload


def test_frames_split_at_peer_frame_size_stay_views() -> None:
    client, _server, sid = tunnel(peer_frame_size=64 * 1024)
    payload = bytes(200 * 1024)
    client.send_data(sid, payload, end_stream=True)
    out = client.data_to_send()
    # The last 8 KiB frame is small: its header and payload are joined.
    assert [len(x) for x in out] == [9, 65536, 9, 65536, 9, 65536, 8192 + 9]
    assert all(isinstance(x, memoryview) and x.obj is payload for x in out[1:6:2])
    assert b"".join(bytes(x) for x in out) == data_frames(sid, payload, 64 * 1024, end_stream=True)


@settings(max_examples=150, deadline=None)
@given(
    writes=st.lists(
        st.one_of(st.integers(min_value=1, max_value=80 * 1024), st.just(0)),
        min_size=1,
        max_size=12,
    ),
    peer_frame_size=st.sampled_from([16384, 20000, 65536, MiB]),
)
def test_any_mix_keeps_the_wire_and_never_copies_big_views(writes: list[int], peer_frame_size: int) -> None:
    """Writes of random sizes (0 = a PING in between): the output is the exact wire, no two small parts are
    adjacent, and every DATA payload above the limit is a part of its own, a view of the caller's payload."""
    client, server, sid = tunnel(peer_frame_size)
    expected = b""
    payloads: list[bytes] = []
    big_frames = 0
    for i, size in enumerate(writes):
        if size == 0:
            client.ping(b"%08d" % i)
            expected += frame(hbone.PING, 0, 0, b"%08d" % i)
            continue
        payload = bytes([i % 251]) * size
        payloads.append(payload)
        assert client.send_data(sid, payload) == size
        expected += data_frames(sid, payload, peer_frame_size)
        frame_sizes = [min(peer_frame_size, size - pos) for pos in range(0, size, peer_frame_size)]
        big_frames += sum(1 for n in frame_sizes if n > COALESCE_LIMIT)
    out = client.data_to_send()
    assert b"".join(bytes(x) for x in out) == expected
    for a, b in itertools.pairwise(out):
        assert len(a) > COALESCE_LIMIT or len(b) > COALESCE_LIMIT
    views = [x for x in out if isinstance(x, memoryview) and len(x) > COALESCE_LIMIT]
    assert len(views) == big_frames
    assert all(any(v.obj is p for p in payloads) for v in views)
    assert received(server, out, sid) == b"".join(payloads)
