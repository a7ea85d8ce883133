"""TLS contexts for mesh mTLS (HBONE, controller gRPC) and SPIFFE peer checks.

Python's ``ssl`` has no custom verification callback, so chain verification is left to OpenSSL (mesh roots as
the only trust anchors, no hostname check, no SNI) and the SPIFFE URI SAN and trust domain are checked right after
the handshake with :func:`peer_identity` / :func:`verify_peer`.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Iterable
from typing import cast

from cryptography import x509

from common.log import kv
from common.spiffe import Identity, InvalidIdentity

log = logging.getLogger(__name__)

ALPN_H2 = "h2"
# What BoringSSL/Envoy negotiates; AES-128-GCM is also the fastest AEAD with AES-NI here.
TLS13_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"

# Modules/_ssl.c: a PySSLContext is PyObject_HEAD followed by its ``SSL_CTX *ctx``.
_SSL_CTX_OFFSET = object.__basicsize__
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
# Python's verify modes as OpenSSL's SSL_VERIFY_PEER (1) | SSL_VERIFY_FAIL_IF_NO_PEER_CERT (2) bits.
_VERIFY_BITS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
_fallback_logged = False


class PeerVerificationError(Exception):
    """The peer presented a certificate that chains to our roots but is not the identity we need."""


def _load_chain(ctx: ssl.SSLContext, cert_chain_pem: str, key_pem: str) -> None:
    # ssl can only load keys from files; use a private tmpfs-backed file that is removed immediately.
    fd, path = tempfile.mkstemp(prefix="ambit-key-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cert_chain_pem)
            if not cert_chain_pem.endswith("\n"):
                f.write("\n")
            f.write(key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class _CiphersuiteError(Exception):
    """The TLS 1.3 suites could not be set safely; OpenSSL's default order stays."""


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl that CPython's ``_ssl`` is linked against, never another copy in the process: RTLD_NOLOAD
    returns the handle of the already-loaded extension, and dlsym on it searches that object's own dependencies.
    (:func:`_check_ssl_ctx` still proves the identity: the SSL_CTX's method table must be this library's.)"""
    path = getattr(_ssl, "__file__", None)
    if not path:
        raise _CiphersuiteError("_ssl is built into the interpreter: no library handle to resolve through")
    lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW | os.RTLD_LOCAL)
    ptr, u64, cint, clong = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_long
    signatures: dict[str, tuple[type, list[type]]] = {
        "SSL_CTX_set_ciphersuites": (cint, [ptr, ctypes.c_char_p]),
        "SSL_CTX_get_options": (u64, [ptr]),
        "SSL_CTX_get_verify_mode": (cint, [ptr]),
        "SSL_CTX_get_ssl_method": (ptr, [ptr]),
        "SSL_CTX_ctrl": (clong, [ptr, cint, clong, ptr]),
        "TLS_server_method": (ptr, []),
        "TLS_client_method": (ptr, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    if sys.implementation.name != "cpython":
        raise _CiphersuiteError(f"{sys.implementation.name} objects have no known layout")
    if type(ctx).__basicsize__ < _SSL_CTX_OFFSET + ctypes.sizeof(ctypes.c_void_p):
        raise _CiphersuiteError(f"SSLContext is only {type(ctx).__basicsize__} bytes")
    ptr = ctypes.c_void_p.from_address(id(ctx) + _SSL_CTX_OFFSET).value
    if not ptr or ptr < 65536 or ptr % ctypes.sizeof(ctypes.c_void_p):
        raise _CiphersuiteError(f"field at offset {_SSL_CTX_OFFSET} ({ptr!r}) is not a heap pointer")
    return ptr


def _check_ssl_ctx(ctx: ssl.SSLContext, ptr: int, lib: ctypes.CDLL) -> None:
    """Prove ``ptr`` is ``ctx``'s SSL_CTX, created by ``lib``, before anything is written through it: read-only
    getters must agree with what Python reports, and its method table must be ``lib``'s static one."""
    methods = {ssl.PROTOCOL_TLS_SERVER: lib.TLS_server_method, ssl.PROTOCOL_TLS_CLIENT: lib.TLS_client_method}
    if ctx.protocol not in methods:
        raise _CiphersuiteError(f"unexpected protocol {ctx.protocol!r}")
    min_version = 0 if ctx.minimum_version is ssl.TLSVersion.MINIMUM_SUPPORTED else int(ctx.minimum_version)
    checks = (
        ("options", lambda: lib.SSL_CTX_get_options(ptr), int(ctx.options)),
        ("verify mode", lambda: lib.SSL_CTX_get_verify_mode(ptr) & 3, _VERIFY_BITS[ctx.verify_mode]),
        ("minimum version", lambda: lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None), min_version),
        ("method (same libssl)", lambda: lib.SSL_CTX_get_ssl_method(ptr), methods[ctx.protocol]()),
    )
    for what, read, expected in checks:
        got = read()
        if got != expected:
            raise _CiphersuiteError(f"SSL_CTX candidate's {what} is {got!r}, SSLContext says {expected!r}")


def _tls13_order(ctx: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"]


def _prefer_tls13_ciphers(ctx: ssl.SSLContext) -> None:
    """Make TLS 1.3 negotiate AES-128-GCM (:data:`TLS13_CIPHERS`) instead of OpenSSL 3's AES-256-GCM default.

    Why: AES-GCM encryption is about a quarter of the agent's CPU per GB, AES-128 runs 10 AES rounds instead of
    14 (same GHASH), and Envoy/BoringSSL already picks it, so both sides of a mixed pair agree. Python 3.11 has no
    API for TLS 1.3 suites (``set_ciphers`` covers only TLS <= 1.2), so OpenSSL's ``SSL_CTX_set_ciphersuites``
    is called through ctypes on the context's own SSL_CTX. That relies on CPython's object layout, so nothing is
    written until the pointer has been proven to be this context's SSL_CTX of the same libssl, and the result is
    read back through ``get_ciphers``; if any step fails, one warning is logged and OpenSSL's defaults stay (still
    TLS 1.3 with AEADs only: slower, never less safe).
    """
    global _fallback_logged
    try:
        lib = _libssl()
        ptr = _ssl_ctx_pointer(ctx)
        _check_ssl_ctx(ctx, ptr, lib)
        if lib.SSL_CTX_set_ciphersuites(ptr, TLS13_CIPHERS.encode()) != 1:
            raise _CiphersuiteError(f"SSL_CTX_set_ciphersuites rejected {TLS13_CIPHERS!r}")
        order = _tls13_order(ctx)
        if order != TLS13_CIPHERS.split(":"):
            raise _CiphersuiteError(f"TLS 1.3 order after the call is {order}")
    except (OSError, AttributeError, _CiphersuiteError) as e:
        level = logging.DEBUG if _fallback_logged else logging.WARNING
        _fallback_logged = True
        log.log(level, "TLS 1.3 cipher order not set, OpenSSL defaults apply", extra=kv(reason=str(e)))


class _DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose ``read``, ``write`` and ``pending`` are the C object's own methods.

    Why: the event loop's TLS transport binds these three once per connection and calls them for every record in
    both directions (two or three times per request on the latency path, about twice per 16 KiB record in bulk);
    ``ssl.SSLObject``'s versions are one-line Python wrappers around the same C calls, a Python frame each with
    cold caches after every wakeup. Same arguments, results and exceptions; the transport always passes the size.
    """

    @classmethod
    def _create(cls, *args: object, **kwargs: object) -> _DirectSSLObject:
        obj = cast(_DirectSSLObject, super()._create(*args, **kwargs))  # type: ignore[misc]
        inner = obj._sslobj  # type: ignore[attr-defined]
        obj.read = inner.read  # type: ignore[method-assign]
        obj.write = inner.write  # type: ignore[method-assign]
        obj.pending = inner.pending  # type: ignore[method-assign]
        return obj


def _base_context(purpose: ssl.Purpose, roots_pem: Iterable[str], alpn: list[str] | None) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.sslobject_class = _DirectSSLObject
    _prefer_tls13_ciphers(ctx)
    roots = "\n".join(r.strip() for r in roots_pem) + "\n"
    ctx.load_verify_locations(cadata=roots)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def server_context(
    cert_chain_pem: str, key_pem: str, roots_pem: Iterable[str], alpn: list[str] | None = None
) -> ssl.SSLContext:
    """Server side of mesh mTLS: client certificate required, chained to one of ``roots_pem``."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, roots_pem, alpn)
    _load_chain(ctx, cert_chain_pem, key_pem)
    return ctx


def client_context(
    roots_pem: Iterable[str],
    cert_chain_pem: str | None = None,
    key_pem: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """Client side: server chain must verify against ``roots_pem``; a client certificate is sent when given."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, roots_pem, alpn)
    if cert_chain_pem and key_pem:
        _load_chain(ctx, cert_chain_pem, key_pem)
    return ctx


def uri_sans(cert_der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def peer_identity(ssl_obj: ssl.SSLObject | ssl.SSLSocket) -> Identity | None:
    """The SPIFFE identity in the peer's leaf certificate, or None when it has none we can parse."""
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        return None
    for uri in uri_sans(der):
        try:
            return Identity.parse(uri)
        except InvalidIdentity:
            continue
    return None


def verify_peer(
    ssl_obj: ssl.SSLObject | ssl.SSLSocket,
    *,
    trust_domain: str | None = None,
    expected: Iterable[Identity] | None = None,
) -> Identity:
    """Check the peer's SPIFFE identity after the handshake: same trust domain and, if given, one of ``expected``."""
    ident = peer_identity(ssl_obj)
    if ident is None:
        raise PeerVerificationError("peer certificate has no SPIFFE URI SAN")
    if trust_domain is not None and ident.trust_domain != trust_domain:
        raise PeerVerificationError(f"peer {ident} is not in trust domain {trust_domain}")
    if expected is not None:
        allowed = set(expected)
        if ident not in allowed:
            raise PeerVerificationError(f"peer {ident} is not one of {sorted(str(i) for i in allowed)}")
    return ident
