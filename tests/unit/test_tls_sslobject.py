"""common.tls contexts hand the TLS transport SSLObjects whose read/write/pending are the C calls themselves:
they must behave exactly like ssl.SSLObject's wrappers (data, partial reads into a buffer, errors)."""

from __future__ import annotations

import ssl
import types

import pytest

from tests.support.pki import Bios, TestCA, handshake

Pair = tuple[ssl.SSLObject, ssl.SSLObject, Bios]


@pytest.fixture(scope="module")
def pair() -> Pair:
    ca = TestCA()
    client_ctx = ca.client_context(ca.issue(ca.identity("ns", "client")))
    server_ctx = ca.server_context(ca.issue(ca.identity("ns", "server")))
    bios = (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    return (*handshake(client_ctx, server_ctx, bios), bios)


def test_read_write_pending_are_the_c_methods(pair: Pair) -> None:
    for side in pair[:2]:
        for name in ("read", "write", "pending"):
            assert isinstance(getattr(side, name), types.BuiltinMethodType), name


def test_records_flow_both_ways_with_buffers_and_pending(pair: Pair) -> None:
    client, server, (c_in, c_out, s_in, s_out) = pair
    payload = bytes(range(256)) * 200  # 51,200 B: several records
    assert client.write(payload) == len(payload)
    s_in.write(c_out.read())
    buf = bytearray(1000)
    got = bytearray()
    n: int = server.read(1000, buf)  # type: ignore[assignment]  # into a buffer (returns a count), as uvloop reads
    got += buf[:n]
    assert server.pending() == 16384 - n  # the rest of the first record is decrypted and waiting
    while len(got) < len(payload):
        got += server.read(65536)
    assert bytes(got) == payload
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1024)
    assert server.write(b"pong") == 4
    c_in.write(s_out.read())
    assert client.read(1024) == b"pong"
