"""A minimal Kubernetes API server for the TokenReview authenticator: real JSON wire format, real HTTP.

Serves ``POST /apis/authentication.k8s.io/v1/tokenreviews`` and ``GET /api/v1/namespaces/{ns}/pods/{name}`` from
in-memory tables so tests drive the official ``kubernetes`` client end to end. To be folded into
tests/support/fake_kube.py once that exists.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class TokenIdentity:
    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    audiences: list[str] = field(default_factory=lambda: ["istio-ca"])


@dataclass
class FakeKubeAuth:
    tokens: dict[str, TokenIdentity] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    fail_with: int | None = None  # answer every request with this HTTP status
    reviews: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def add_pod(self, namespace: str, name: str, uid: str, service_account: str, node: str) -> None:
        self.pods[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {"serviceAccountName": service_account, "nodeName": node, "containers": []},
            "status": {"phase": "Running"},
        }

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


POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/?]+)")


def _status(code: int, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message, "code": code}


@contextmanager
def serve(state: FakeKubeAuth) -> Iterator[FakeKubeAuth]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if state.fail_with:
                self._send(state.fail_with, _status(state.fail_with, "injected failure"))
            elif self.path.startswith("/apis/authentication.k8s.io/v1/tokenreviews"):
                self._send(201, state.review(body))
            else:
                self._send(404, _status(404, "not found"))

        def do_GET(self) -> None:
            m = POD_PATH.match(self.path)
            if state.fail_with:
                self._send(state.fail_with, _status(state.fail_with, "injected failure"))
            elif m and (m.group(1), m.group(2)) in state.pods:
                self._send(200, state.pods[(m.group(1), m.group(2))])
            else:
                self._send(404, _status(404, f'pods "{m.group(2) if m else "?"}" not found'))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
