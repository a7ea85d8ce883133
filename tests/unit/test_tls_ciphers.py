"""TLS 1.3 cipher preference of common.tls contexts: AES-128-GCM first, set through OpenSSL on the context's own
SSL_CTX, and a safe fallback (warning, OpenSSL defaults) whenever that SSL_CTX cannot be proven."""

from __future__ import annotations

import ctypes
import logging
import ssl

import pytest

from common import tls
from tests.support.pki import TestCA, handshake

AES128, AES256 = "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"


def tls13_order(ctx: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]


def openssl_default_order() -> list[str]:
    return tls13_order(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "_fallback_logged", False)


class SpyLib:
    """The real libssl, recording every SSL_CTX_set_ciphersuites call (the only write)."""

    def __init__(self, set_result: int | None = None) -> None:
        self._lib = tls._libssl()
        self._set_result = set_result
        self.set_calls: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)

    def SSL_CTX_set_ciphersuites(self, ptr: int, suites: bytes) -> int:
        self.set_calls.append(ptr)
        if self._set_result is not None:
            return self._set_result
        return int(self._lib.SSL_CTX_set_ciphersuites(ptr, suites))


def test_openssl_default_is_not_already_our_order() -> None:
    # Otherwise the tests below could not tell a working helper from a no-op.
    assert openssl_default_order()[0] != AES128


def test_server_and_client_contexts_put_aes128_first(ca: TestCA) -> None:
    leaf = ca.issue(ca.identity("ns", "sa"))
    for ctx in (ca.server_context(leaf), ca.client_context(leaf), ca.client_context(None)):
        assert tls13_order(ctx) == [AES128, AES256]


def test_handshake_between_our_contexts_negotiates_aes128(ca: TestCA) -> None:
    server_ctx = ca.server_context(ca.issue(ca.identity("ns", "server")))
    client_ctx = ca.client_context(ca.issue(ca.identity("ns", "client")))
    client, server = handshake(client_ctx, server_ctx)
    for side in (client, server):
        assert side.version() == "TLSv1.3"
        cipher = side.cipher()
        assert cipher is not None and cipher[0] == AES128
    assert tls.verify_peer(server).service_account == "client"


def test_server_order_wins_over_a_client_preferring_aes256(ca: TestCA) -> None:
    # A stock Python client offers AES-256 first; our server picks by its own preference.
    server_ctx = ca.server_context(ca.issue(ca.identity("ns", "server")))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cadata=ca.root_pem)
    leaf = ca.issue(ca.identity("ns", "client"))
    tls._load_chain(client_ctx, leaf.chain_pem, leaf.key_pem)
    assert tls13_order(client_ctx)[0] == AES256
    _, server = handshake(client_ctx, server_ctx)
    cipher = server.cipher()
    assert cipher is not None and cipher[0] == AES128


def test_pointer_to_another_ssl_ctx_is_refused_without_writing(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warning: None
) -> None:
    # A real SSL_CTX, but not the context's own (a client's, for a server context): validation must catch it.
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    other_ptr = ctypes.c_void_p.from_address(id(other) + tls._SSL_CTX_OFFSET).value
    spy = SpyLib()
    monkeypatch.setattr(tls, "_libssl", lambda: spy)
    monkeypatch.setattr(tls, "_ssl_ctx_pointer", lambda ctx: other_ptr)
    with caplog.at_level(logging.WARNING, logger="common.tls"):
        ctx = ca.server_context(ca.issue(ca.identity("ns", "sa")))
    assert spy.set_calls == []
    assert tls13_order(ctx) == openssl_default_order()
    assert tls13_order(other) == openssl_default_order()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "SSL_CTX candidate" in str(caplog.records[0].fields)  # type: ignore[attr-defined]


def test_wrong_offset_is_refused_and_context_still_works(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warning: None
) -> None:
    # Offset 0 is the reference count: not a pointer at all, rejected before anything is called.
    spy = SpyLib()
    monkeypatch.setattr(tls, "_libssl", lambda: spy)
    monkeypatch.setattr(tls, "_SSL_CTX_OFFSET", 0)
    with caplog.at_level(logging.WARNING, logger="common.tls"):
        server_ctx = ca.server_context(ca.issue(ca.identity("ns", "server")))
        client_ctx = ca.client_context(ca.issue(ca.identity("ns", "client")))
    assert spy.set_calls == []
    assert tls13_order(server_ctx) == tls13_order(client_ctx) == openssl_default_order()
    # One warning per process, not one per context.
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    client, _ = handshake(client_ctx, server_ctx)
    cipher = client.cipher()
    assert cipher is not None and cipher[0] == openssl_default_order()[0]


def test_failing_validator_keeps_defaults(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warning: None
) -> None:
    def refuse(ctx: ssl.SSLContext, ptr: int, lib: object) -> None:
        raise tls._CiphersuiteError("layout changed")

    spy = SpyLib()
    monkeypatch.setattr(tls, "_libssl", lambda: spy)
    monkeypatch.setattr(tls, "_check_ssl_ctx", refuse)
    with caplog.at_level(logging.WARNING, logger="common.tls"):
        ctx = ca.client_context(None)
    assert spy.set_calls == []
    assert tls13_order(ctx) == openssl_default_order()
    assert "layout changed" in str(caplog.records[0].fields)  # type: ignore[attr-defined]


def test_missing_library_keeps_defaults(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warning: None
) -> None:
    def unavailable() -> None:
        raise OSError("libssl: cannot open shared object file")

    monkeypatch.setattr(tls, "_libssl", unavailable)
    with caplog.at_level(logging.WARNING, logger="common.tls"):
        ctx = ca.client_context(None)
    assert tls13_order(ctx) == openssl_default_order()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_call_without_effect_is_reported(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warning: None
) -> None:
    # The write "succeeds" but get_ciphers shows no change: reported, not trusted.
    spy = SpyLib(set_result=1)
    monkeypatch.setattr(tls, "_libssl", lambda: spy)
    with caplog.at_level(logging.WARNING, logger="common.tls"):
        ctx = ca.client_context(None)
    assert len(spy.set_calls) == 1
    assert tls13_order(ctx) == openssl_default_order()
    assert "order after the call" in str(caplog.records[0].fields)  # type: ignore[attr-defined]
