"""``istio.v1.auth.IstioCertificateService/CreateCertificate``: who may get which certificate.

A node agent asks on behalf of a workload (``ImpersonatedIdentity`` in the request's ``metadata`` Struct, as
ztunnel does). The request is granted only when the agent is authenticated (:mod:`controller.node_auth`) and the
controller's model has a pod with that namespace and service account on the agent's own node. Every outcome is
counted; every refusal carries a precise status code and a message saying which field is wrong.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from api.istio.v1.auth import ca_pb2, ca_pb2_grpc
from common.log import kv
from common.spiffe import Identity, InvalidIdentity
from controller.ca import (
    DEFAULT_TTL_SECONDS,
    CaError,
    CaExpiredError,
    CertificateAuthority,
    CsrError,
    IdentityError,
    TtlError,
)
from controller.node_auth import (
    AuthBackendError,
    AuthenticationError,
    Authenticator,
    AuthError,
    Caller,
    UntrustedCallerError,
)

log = logging.getLogger("ambit.ca_service")

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_SERVING_DNS_NAMES = ("ambit-controller", "istiod.istio-system.svc", "localhost")
DEFAULT_SERVING_IPS = ("127.0.0.1",)


class PodIndex(Protocol):
    def has_pod(self, node: str, namespace: str, service_account: str) -> bool: ...


@dataclass(frozen=True)
class Refusal(Exception):
    code: grpc.StatusCode
    reason: str
    message: str


_AUTH_CODES: dict[type[AuthError], grpc.StatusCode] = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    UntrustedCallerError: grpc.StatusCode.PERMISSION_DENIED,
    AuthBackendError: grpc.StatusCode.UNAVAILABLE,
}


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        pods: PodIndex,
        authenticator: Authenticator,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.ca = ca
        self.pods = pods
        self.authenticator = authenticator
        self.requests = Counter(
            "ambit_ca_requests",
            "CreateCertificate outcomes by result (granted/refused/error) and reason",
            ["result", "reason"],
            registry=registry if registry is not None else REGISTRY,
        )
        # Istio's names, so existing alerts on istiod's CA keep working.
        Gauge(
            "citadel_server_root_cert_expiry_timestamp",
            "Unix time when the CA's signing chain or a bundled root expires (earliest)",
            registry=registry if registry is not None else REGISTRY,
        ).set_function(ca.earliest_expiry)
        Gauge(
            "citadel_server_cert_chain_expiry_timestamp",
            "Unix time when the signing chain expires; workload certificates are cut to it",
            registry=registry if registry is not None else REGISTRY,
        ).set_function(ca.chain_expiry)

    async def _caller(self, metadata: Sequence[tuple[str, str | bytes]]) -> Caller:
        try:
            return await self.authenticator.authenticate(metadata)
        except AuthError as e:
            code = next((c for t, c in _AUTH_CODES.items() if isinstance(e, t)), grpc.StatusCode.UNAUTHENTICATED)
            raise Refusal(code, e.reason, str(e)) from None

    def _identity(self, request: ca_pb2.IstioCertificateRequest) -> Identity:
        fields = request.metadata.fields if request.HasField("metadata") else {}
        if IMPERSONATED_IDENTITY not in fields:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "missing_identity",
                f"metadata.{IMPERSONATED_IDENTITY} is required: the node agent must name the workload identity",
            )
        value = fields[IMPERSONATED_IDENTITY]
        if value.WhichOneof("kind") != "string_value":
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, "bad_identity", f"metadata.{IMPERSONATED_IDENTITY} must be a string"
            )
        try:
            ident = Identity.parse(value.string_value)
        except InvalidIdentity as e:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT, "bad_identity", f"metadata.{IMPERSONATED_IDENTITY}: {e}"
            ) from None
        if ident.trust_domain != self.ca.trust_domain:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "foreign_trust_domain",
                f"metadata.{IMPERSONATED_IDENTITY}: {ident} is not in trust domain {self.ca.trust_domain}",
            )
        return ident

    async def _decide(self, request: ca_pb2.IstioCertificateRequest, metadata: Any) -> tuple[Caller, list[str]]:
        caller = await self._caller(metadata)
        ident = self._identity(request)
        if request.validity_duration > self.ca.max_ttl_seconds:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ttl_too_large",
                f"validity_duration {request.validity_duration}s exceeds the maximum {self.ca.max_ttl_seconds}s",
            )
        if not self.pods.has_pod(caller.node, ident.namespace, ident.service_account):
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "not_on_node",
                f"node {caller.node} runs no pod with service account {ident.namespace}/{ident.service_account}",
            )
        try:
            chain = self.ca.sign_csr(request.csr, ident, request.validity_duration)
        except CsrError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, e.reason, f"csr: {e}") from None
        except TtlError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "ttl_too_large", f"validity_duration: {e}") from None
        except IdentityError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "foreign_trust_domain", str(e)) from None
        log.info(
            "certificate issued",
            extra=kv(caller=caller.subject, node=caller.node, identity=str(ident), ttl=request.validity_duration),
        )
        return caller, chain

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            _, chain = await self._decide(request, context.invocation_metadata() or ())
        except Refusal as r:
            self.requests.labels("refused" if r.code != grpc.StatusCode.UNAVAILABLE else "error", r.reason).inc()
            log.warning("certificate request refused", extra=kv(code=r.code.name, reason=r.reason, error=r.message))
            await context.abort(r.code, r.message)
        except CaError as e:
            self.requests.labels("error", "ca_expired" if isinstance(e, CaExpiredError) else "ca_error").inc()
            log.error("CA failed to sign", extra=kv(error=str(e)))
            await context.abort(grpc.StatusCode.INTERNAL, f"CA failed to sign: {e}")
        except Exception:
            self.requests.labels("error", "internal").inc()
            log.exception("certificate request crashed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error while issuing the certificate")
        self.requests.labels("granted", "ok").inc()
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


def add_to_server(
    server: grpc.aio.Server,
    ca: CertificateAuthority,
    pods: PodIndex,
    authenticator: Authenticator,
    registry: CollectorRegistry | None = None,
) -> CertificateService:
    service = CertificateService(ca, pods, authenticator, registry)
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)
    return service


class _ServingCertificate:
    """Re-issues the controller's serving certificate at half-life and whenever the CA changes (rotation).

    gRPC calls :meth:`fetch` from a core thread before each TLS handshake; returning None keeps the current one.
    """

    def __init__(self, ca: CertificateAuthority, dns_names: Sequence[str], ips: Sequence[str], ttl: int) -> None:
        self.ca, self.dns_names, self.ips, self.ttl = ca, dns_names, ips, ttl
        self._lock = threading.Lock()
        self._not_after = 0.0
        self.initial = self._issue()

    def _issue(self) -> grpc.ServerCertificateConfiguration:
        self._generation = self.ca.generation
        pair = self.ca.issue_serving_certificate(self.dns_names, self.ips, self.ttl)
        not_after = pair.not_after.timestamp()
        if not_after <= self._not_after:
            # Cut to the same expiring CA as the one it replaces: re-issuing before then gains nothing, and at half
            # of an ever shorter life it would re-issue at every handshake in the CA's last seconds.
            self._refresh_at = not_after
        else:
            self._refresh_at = time.time() + (not_after - time.time()) / 2
        self._not_after = not_after
        return grpc.ssl_server_certificate_configuration([(pair.key_pem.encode(), "".join(pair.chain_pem).encode())])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                self.ca.reload_if_changed()
                if self.ca.generation == self._generation and time.time() < self._refresh_at:
                    return None
                config = self._issue()
            log.info("controller serving certificate re-issued", extra=kv(generation=self._generation))
            return config
        except Exception:
            log.exception("re-issuing the controller serving certificate failed; keeping the current one")
            return None


def server_credentials(
    ca: CertificateAuthority,
    dns_names: Iterable[str] = DEFAULT_SERVING_DNS_NAMES,
    ip_addresses: Iterable[str] = DEFAULT_SERVING_IPS,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
) -> grpc.ServerCredentials:
    """TLS credentials for port 15012 with a serving certificate from our own CA, kept fresh across rotations.

    Agents authenticate with bearer tokens, not client certificates, so none is requested.
    """
    serving = _ServingCertificate(ca, list(dns_names), list(dict.fromkeys(ip_addresses)), ttl_seconds)
    fetch: Any = serving.fetch  # grpc-stubs omit that the fetcher may return None ("no change")
    return grpc.dynamic_ssl_server_credentials(serving.initial, fetch, require_client_authentication=False)
