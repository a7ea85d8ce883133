"""A certificate provider with CertificateManager's interface over the test CA (tests/support/pki.py).

Proxy tests need real mTLS with per-workload SPIFFE certificates but not the CA round trip (the identity
tests cover that).
"""

from __future__ import annotations

import ssl

from common.spiffe import Identity
from tests.support.pki import Leaf, TestCA


class StaticCertificates:
    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.ca = TestCA(trust_domain)
        self.trust_domain = trust_domain
        self._leaves: dict[Identity, Leaf] = {}
        self._server: dict[Identity, ssl.SSLContext] = {}
        self._client: dict[Identity, ssl.SSLContext] = {}

    def roots(self) -> list[str]:
        return [self.ca.root_pem]

    def leaf(self, ident: Identity) -> Leaf:
        if ident not in self._leaves:
            self._leaves[ident] = self.ca.issue(ident)
        return self._leaves[ident]

    async def server_context(self, ident: Identity) -> ssl.SSLContext:
        if ident not in self._server:
            self._server[ident] = self.ca.server_context(self.leaf(ident))
        return self._server[ident]

    async def client_context(self, ident: Identity) -> ssl.SSLContext:
        if ident not in self._client:
            self._client[ident] = self.ca.client_context(self.leaf(ident))
        return self._client[ident]

    def snapshot(self) -> list[dict[str, str]]:
        return [{"identity": str(i), "state": "Available"} for i in sorted(self._leaves)]
