"""What the identity code needs from the API server, added to tests/support/fake_kube.py with its ``add_route``.

- :func:`install`: ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answered from a token table in the real
  TokenReview JSON, and ``GET /api/v1/namespaces/{ns}/pods/{name}`` from the fake's pod collection (what
  ``upsert`` stored), so the controller's TokenReview authenticator runs end to end against it;
- :func:`install_objects`: ``GET``/``POST``/``PUT`` of namespaced Secrets or ConfigMaps, for the CA kept in a
  Secret and the trust bundle published in a ConfigMap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tests.support.fake_kube import FakeKube, status_object

PODS = "/api/v1/pods"


@dataclass
class TokenIdentity:
    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    audiences: list[str] = field(default_factory=lambda: ["istio-ca"])


@dataclass
class TokenReviews:
    tokens: dict[str, TokenIdentity] = field(default_factory=dict)
    fail_with: int | None = None  # answer TokenReviews and pod reads with this HTTP status
    reviews: list[dict[str, Any]] = field(default_factory=list)

    def review(self, body: dict[str, Any]) -> dict[str, Any]:
        self.reviews.append(body)
        spec = body.get("spec", {})
        ident = self.tokens.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        status: dict[str, Any]
        if ident is None or (wanted and not set(wanted) & set(ident.audiences)):
            status = {"authenticated": False, "error": "invalid bearer token"}
        else:
            extra = {}
            if ident.pod_name:
                extra["authentication.kubernetes.io/pod-name"] = [ident.pod_name]
                extra["authentication.kubernetes.io/pod-uid"] = [ident.pod_uid or ""]
            status = {
                "authenticated": True,
                "audiences": [a for a in ident.audiences if not wanted or a in wanted],
                "user": {
                    "username": f"system:serviceaccount:{ident.namespace}:{ident.service_account}",
                    "uid": "u-" + ident.service_account,
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ident.namespace}"],
                    "extra": extra,
                },
            }
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}


def install(fake: FakeKube) -> TokenReviews:
    """Add the two routes to ``fake``; returns the token table to fill."""
    table = TokenReviews()

    def token_review(_: re.Match[str], body: Any) -> tuple[int, Any]:
        if table.fail_with:
            return table.fail_with, status_object(table.fail_with, "InternalError", "injected failure")
        return 201, table.review(body or {})

    def read_pod(match: re.Match[str], _: Any) -> tuple[int, Any]:
        if table.fail_with:
            return table.fail_with, status_object(table.fail_with, "InternalError", "injected failure")
        ns, name = match.group(1), match.group(2)
        with fake.cond:
            obj = fake.collections[PODS].items.get((ns, name))
        if obj is None:
            return 404, status_object(404, "NotFound", f'pods "{name}" not found')
        return 200, obj

    fake.add_route("POST", r"/apis/authentication\.k8s\.io/v1/tokenreviews", token_review)
    fake.add_route("GET", r"/api/v1/namespaces/([^/]+)/pods/([^/]+)", read_pod)
    return table


def pod(namespace: str, name: str, uid: str, service_account: str, node: str, ip: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": {"app": service_account}},
        "spec": {"nodeName": node, "serviceAccountName": service_account, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip},
    }


@dataclass
class Objects:
    """Namespaced objects of one resource (``secrets``, ``configmaps``) kept by the fake."""

    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    creates: int = 0
    replaces: int = 0


def install_objects(fake: FakeKube, plural: str, kind: str) -> Objects:
    """GET, POST (409 AlreadyExists on a second create) and PUT (404 when absent) of namespaced ``plural``."""
    store = Objects()

    def read(match: re.Match[str], _: Any) -> tuple[int, Any]:
        obj = store.items.get((match.group(1), match.group(2)))
        if obj is None:
            return 404, status_object(404, "NotFound", f'{plural} "{match.group(2)}" not found')
        return 200, obj

    def stored(ns: str, body: Any) -> dict[str, Any]:
        obj = dict(body or {}, apiVersion="v1", kind=kind)
        obj["metadata"] = dict(obj.get("metadata") or {}, namespace=ns)
        return obj

    def create(match: re.Match[str], body: Any) -> tuple[int, Any]:
        obj = stored(match.group(1), body)
        key = (match.group(1), obj["metadata"].get("name", ""))
        with fake.cond:  # requests are served on threads; a create is atomic on a real API server
            if key in store.items:
                return 409, status_object(409, "AlreadyExists", f'{plural} "{key[1]}" already exists')
            store.items[key] = obj
            store.creates += 1
        return 201, obj

    def replace(match: re.Match[str], body: Any) -> tuple[int, Any]:
        key = (match.group(1), match.group(2))
        if key not in store.items:
            return 404, status_object(404, "NotFound", f'{plural} "{key[1]}" not found')
        store.items[key] = stored(key[0], body)
        store.replaces += 1
        return 200, store.items[key]

    fake.add_route("GET", rf"/api/v1/namespaces/([^/]+)/{plural}/([^/]+)", read)
    fake.add_route("PUT", rf"/api/v1/namespaces/([^/]+)/{plural}/([^/]+)", replace)
    fake.add_route("POST", rf"/api/v1/namespaces/([^/]+)/{plural}", create)
    return store
