"""SPIFFE identities as Istio uses them: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"


class InvalidIdentity(ValueError):
    """A string that is not an Istio-shaped SPIFFE ID."""


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse exactly five path segments, as istio's ParseIdentity does; anything else is rejected."""
        if not uri.startswith("spiffe://"):
            raise InvalidIdentity(f"{uri!r}: not a SPIFFE ID (must start with spiffe://)")
        parts = uri[len("spiffe://") :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise InvalidIdentity(f"{uri!r}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>")
        return cls(parts[0], parts[2], parts[4])

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy principals use: the URI without the ``spiffe://`` scheme."""
        return str(self)[len("spiffe://") :]
