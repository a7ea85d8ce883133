"""A small fake Kubernetes API server speaking the real list/watch JSON wire format, for tests.

- ``GET <collection>`` -> ``<Kind>List`` with ``metadata.resourceVersion`` (items of built-in kinds without
  kind/apiVersion, as the real server sends them).
- ``GET <collection>?watch=true&resourceVersion=N&allowWatchBookmarks=true`` -> a chunked stream of
  ``{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}`` lines: history after N, then live events.
  N older than the compaction point -> an ``ERROR`` event carrying a ``Status`` with code 410 "Expired".
- :meth:`FakeKube.drop_watches` closes open watch connections (a dropped watch), :meth:`FakeKube.expire` compacts
  history so that resuming watches get 410, :meth:`FakeKube.bookmark` sends a BOOKMARK.
- Other engineers add endpoints with :meth:`FakeKube.add_route` (e.g. ``POST .../tokenreviews``).
- A list with ``limit`` is paginated as the real server does from etcd: every page of one list comes from the
  snapshot of its first page, ``metadata.continue`` names the rest; :attr:`FakeKube.expire_continues` answers that
  many next continue requests with 410 Expired (the token outlived etcd's compaction).
- :attr:`FakeKube.fail_lists` failures answer with :attr:`FakeKube.fail_list_status` and, when set, a
  ``Retry-After`` header (:attr:`FakeKube.fail_list_retry_after`), as priority and fairness sends with 429.
- :attr:`FakeKube.short_watches` (by collection path) answers that many next watches with an empty stream the server
  ends at once (an API server shutting down, a proxy closing it); :attr:`FakeKube.request_times` holds when each
  request in :attr:`FakeKube.requests` arrived.
- :attr:`FakeKube.cut_next_event` (collection paths): the next event of an open watch of that collection is cut in
  the middle of its line, the connection closed there (a connection lost mid-event); with
  :attr:`FakeKube.end_mid_event` the response is ended properly there instead (a proxy that ends the body it relays
  when its upstream connection is lost).
- :attr:`FakeKube.refuse_watches` (by collection path): the next watch is answered with that HTTP status and its
  ``Status`` (410 Expired: the API server refusing a version compacted away before the watch started).
- CustomResourceDefinitions (``apiextensions.k8s.io/v1``) follow the collections served, as the API server serves a
  custom resource exactly while its CRD is Established: each non-built-in collection has its CRD (Established,
  serving the versions at which it is in :attr:`FakeKube.collections`); adding a collection there, or removing
  one, records the CRD's ADDED/MODIFIED/DELETED. :meth:`FakeKube.install_kind` with ``established=False`` records
  the CRD of a collection not served yet (just created, not Established). :attr:`FakeKube.forbidden` (collection
  paths) answers 403 Forbidden, as RBAC without a grant.
- ``serve(fake, tls=context)`` serves HTTPS (an in-cluster client's only scheme); :attr:`FakeKube.accepted_tokens`,
  when set, answers 401 to requests without one of these bearer tokens (a rotated service account token);
  :attr:`FakeKube.tokens_seen` holds each request's token.

It runs an ``http.server`` in a thread: test infrastructure, not product code.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Route handler: (regex match, parsed JSON body or None) -> (HTTP status, JSON object)
RouteHandler = Callable[[re.Match[str], Any], tuple[int, Any]]


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Collection:
    kind: str
    api_version: str
    builtin: bool
    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (rv, type, object)
    compacted: int = 0  # watches from a version below this get 410 Expired


COLLECTIONS = {
    "/api/v1/namespaces": ("Namespace", "v1"),
    "/api/v1/nodes": ("Node", "v1"),
    "/api/v1/pods": ("Pod", "v1"),
    "/api/v1/services": ("Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "/apis/networking.istio.io/v1/serviceentries": ("ServiceEntry", "networking.istio.io/v1"),
    "/apis/networking.istio.io/v1/workloadentries": ("WorkloadEntry", "networking.istio.io/v1"),
    "/apis/security.istio.io/v1/authorizationpolicies": ("AuthorizationPolicy", "security.istio.io/v1"),
    "/apis/security.istio.io/v1/peerauthentications": ("PeerAuthentication", "security.istio.io/v1"),
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", "apiextensions.k8s.io/v1"),
}
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
BUILTIN_PREFIXES = ("/api/", "/apis/discovery.k8s.io/", "/apis/apiextensions.k8s.io/")


def crd_object(group: str, plural: str, kind: str, versions: list[str], established: bool = True) -> dict[str, Any]:
    """A CustomResourceDefinition as the API server returns it (schema elided), Established or still installing."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "uid": f"crd-{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": i == 0,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
                for i, v in enumerate(versions)
            ],
        },
        "status": {
            "acceptedNames": {"plural": plural, "kind": kind},
            "storedVersions": versions[:1],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                {
                    "type": "Established",
                    "status": "True" if established else "False",
                    "reason": "InitialNamesAccepted" if established else "Installing",
                },
            ],
        },
    }


def _custom_path(path: str) -> tuple[str, str, str] | None:
    """(group, version, plural) of a custom resource's collection path, None for a built-in one."""
    parts = path.strip("/").split("/")
    if path.startswith(BUILTIN_PREFIXES) or len(parts) != 4 or parts[0] != "apis":
        return None
    return parts[1], parts[2], parts[3]


class _Collections(dict[str, "Collection"]):
    """The collections served, by path; adding or removing a custom resource's collection records its CRD's event."""

    def __init__(self, owner: FakeKube, items: dict[str, Collection]) -> None:
        super().__init__(items)
        self._owner = owner

    def __setitem__(self, path: str, coll: Collection) -> None:
        super().__setitem__(path, coll)
        self._owner._crd_follows(path, coll)

    def __delitem__(self, path: str) -> None:
        coll = self[path]
        super().__delitem__(path)
        self._owner._crd_follows(path, coll)

    def pop(self, path: str, *default: Any) -> Any:
        if path not in self:
            return super().pop(path, *default)
        coll = super().pop(path)
        self._owner._crd_follows(path, coll)
        return coll


class FakeKube:
    def __init__(self) -> None:
        collections = {
            # Built-in kinds' list items come without kind and apiVersion (CRDs' keep them), in any group.
            path: Collection(kind, api, builtin=path.startswith(BUILTIN_PREFIXES))
            for path, (kind, api) in COLLECTIONS.items()
        }
        self.resource_version = 100
        self.cond = threading.Condition()
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.routes: list[tuple[str, re.Pattern[str], RouteHandler]] = []
        self.fail_lists: int = 0  # answer this many next list requests with 500
        self.fail_list_status = 500  # the status of those failures
        self.fail_list_retry_after: str | None = None  # their Retry-After header, if any
        self.refuse_watches: dict[str, int] = {}  # collection path -> HTTP status answering its next watch
        self.short_watches: dict[str, int] = {}  # collection path -> next watches ended at once, without events
        self.expire_continues = 0  # answer this many next continue requests with 410 Expired
        self.cut_next_event: set[str] = set()  # collection paths whose next watch event is cut mid-line
        self.end_mid_event = False  # a cut event ends the chunked body properly, not the connection
        self.accepted_tokens: set[str] | None = None  # bearer tokens answered; None: any, or none
        self.tokens_seen: list[str] = []  # the bearer token of each request ("" without one)
        self.request_times: list[float] = []  # time.monotonic() of each entry of requests
        self._snapshots: dict[str, tuple[str, list[dict[str, Any]]]] = {}  # paginated lists: (version, items) by id
        self._snapshot_ids = itertools.count(1)
        self._watch_sockets: dict[socket.socket, str] = {}  # open watch connections and their collection
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.forbidden: set[str] = set()  # collection paths answered 403 Forbidden (no RBAC grant)
        self.collections = _Collections(self, collections)
        crds = self.collections[CRD_PATH]
        for path, coll in collections.items():  # installed before the server started: no events
            if custom := _custom_path(path):
                group, version, plural = custom
                crd = crd_object(group, plural, coll.kind, [version])
                crd["metadata"]["resourceVersion"] = "1"
                crds.items[("", crd["metadata"]["name"])] = crd

    # ---- test controls ---------------------------------------------------------------------------------------

    def collection(self, kind: str) -> Collection:
        return next(c for c in self.collections.values() if c.kind == kind)

    def serve_version(self, kind: str, version: str) -> None:
        """Serve ``kind`` at another API version only (e.g. v1beta1 for clusters with older Istio CRDs)."""
        path = next(p for p, c in self.collections.items() if c.kind == kind)
        coll = self.collections.pop(path)
        group = coll.api_version.rpartition("/")[0]
        coll.api_version = f"{group}/{version}"
        self.collections[f"/apis/{coll.api_version}/{path.rsplit('/', 1)[1]}"] = coll

    def _crd_follows(self, path: str, coll: Collection) -> None:
        """The CRD of a custom resource's collection, after the collection was added or removed: Established and
        serving the versions it is at now, or deleted when it is at none."""
        custom = _custom_path(path)
        if custom is None:
            return
        group, _, plural = custom
        served = [_custom_path(p) for p in self.collections]
        versions = [c[1] for c in served if c is not None and c[0] == group and c[2] == plural]
        name = f"{plural}.{group}"
        if versions:
            self.upsert(crd_object(group, plural, coll.kind, versions))
        elif ("", name) in self.collections[CRD_PATH].items:
            self.delete("CustomResourceDefinition", "", name)

    def remove_kind(self, kind: str) -> tuple[str, Collection]:
        """Stop serving ``kind`` (its CRD deleted): (its path, its collection) for :meth:`install_kind`."""
        path = next(p for p, c in self.collections.items() if c.kind == kind)
        return path, self.collections.pop(path)

    def install_kind(self, path: str, coll: Collection, established: bool = True) -> None:
        """Serve a collection again (its CRD created and Established), or only record its CRD as created but not
        Established yet (nothing served)."""
        if established:
            self.collections[path] = coll
            return
        group, version, plural = _custom_path(path) or ("", "", "")
        self.upsert(crd_object(group, plural, coll.kind, [version], established=False))

    def add_route(self, method: str, pattern: str, handler: RouteHandler) -> None:
        """Serve ``method`` requests whose path matches ``pattern`` (full match) with ``handler``."""
        self.routes.append((method.upper(), re.compile(pattern), handler))

    def _record(self, coll: Collection, event: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.resource_version += 1
        obj = json.loads(json.dumps(obj))
        obj.setdefault("kind", coll.kind)
        obj.setdefault("apiVersion", coll.api_version)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.resource_version)
        coll.history.append((self.resource_version, event, obj))
        self.cond.notify_all()
        return obj

    def upsert(self, obj: dict[str, Any]) -> None:
        """ADDED or MODIFIED, by whether the object exists."""
        coll = self.collection(obj["kind"])
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        with self.cond:
            event = "MODIFIED" if key in coll.items else "ADDED"
            coll.items[key] = self._record(coll, event, obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        coll = self.collection(kind)
        with self.cond:
            obj = coll.items.pop((namespace, name))
            self._record(coll, "DELETED", obj)

    def bookmark(self, kind: str) -> None:
        coll = self.collection(kind)
        with self.cond:
            self.resource_version += 1
            obj = {
                "kind": coll.kind,
                "apiVersion": coll.api_version,
                "metadata": {"resourceVersion": str(self.resource_version)},
            }
            coll.history.append((self.resource_version, "BOOKMARK", obj))
            self.cond.notify_all()

    def expire(self, kind: str) -> None:
        """Compact history: open and resuming watches of ``kind`` get 410 Expired."""
        coll = self.collection(kind)
        with self.cond:
            self.resource_version += 1  # a list after this returns a version a watch may start from
            coll.compacted = self.resource_version
            coll.history.clear()
            self.cond.notify_all()

    def drop_watches(self) -> None:
        with self.cond:
            for s in list(self._watch_sockets):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._watch_sockets.clear()

    def open_watches(self, path: str) -> int:
        with self.cond:
            return sum(1 for p in self._watch_sockets.values() if p == path)

    def count(self, method: str, path: str, watch: bool) -> int:
        return sum(
            1 for m, p, q in list(self.requests) if m == method and p == path and (q.get("watch") == "true") == watch
        )

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "fake-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    # ---- serving ---------------------------------------------------------------------------------------------

    def list_body(self, coll: Collection) -> dict[str, Any]:
        items = []
        for obj in coll.items.values():
            item = dict(obj)
            if coll.builtin:
                item.pop("kind", None)
                item.pop("apiVersion", None)
            items.append(item)
        return {
            "kind": f"{coll.kind}List",
            "apiVersion": coll.api_version,
            "metadata": {"resourceVersion": str(self.resource_version)},
            "items": items,
        }

    def list_page(self, coll: Collection, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """A list honouring ``limit`` and ``continue`` (call with ``cond`` held): later pages come from the first
        page's snapshot, so the pages make one consistent list, as etcd serves them at one revision."""
        body = self.list_body(coll)
        token = query.get("continue")
        if token:
            snapshot, offset = token.rsplit(":", 1)
            if self.expire_continues > 0 or snapshot not in self._snapshots:
                self.expire_continues = max(0, self.expire_continues - 1)
                return 410, status_object(410, "Expired", "The provided continue parameter is too old")
            version, items = self._snapshots[snapshot]
            body["metadata"]["resourceVersion"] = version
            start = int(offset)
        elif query.get("limit"):
            snapshot, items, start = str(next(self._snapshot_ids)), body["items"], 0
            self._snapshots[snapshot] = (body["metadata"]["resourceVersion"], items)
        else:
            return 200, body
        end = start + int(query["limit"])
        body["items"] = items[start:end]
        if end < len(items):
            body["metadata"]["continue"] = f"{snapshot}:{end}"
            body["metadata"]["remainingItemCount"] = len(items) - end
        return 200, body

    def watch_events(self, coll: Collection, since: int, bookmarks: bool, stop: threading.Event) -> Iterator[Any]:
        """Events after ``since``; blocks for new ones; an ERROR 410 when ``since`` was compacted away."""
        last = since
        while not stop.is_set():
            with self.cond:
                if last < coll.compacted:
                    yield {
                        "type": "ERROR",
                        "object": status_object(410, "Expired", f"too old resource version: {last}"),
                    }
                    return
                pending = [(rv, t, o) for rv, t, o in coll.history if rv > last]
                if not pending:
                    self.cond.wait(0.5)
                    continue
            for rv, event, obj in pending:
                last = rv
                if event == "BOOKMARK" and not bookmarks:
                    continue
                yield {"type": event, "object": obj}


# ---- object builders for tests -----------------------------------------------------------------------------


def namespace(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "uid": f"ns-{name}", "labels": {"istio.io/dataplane-mode": "ambient"}},
    }


def pod(name: str, ip: str, ns: str = "demo") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{name}",
            "labels": {"app": "web"},
            "managedFields": [],
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"nodeName": "node1", "serviceAccountName": "web", "containers": [{"name": "app", "image": "x"}]},
        "status": {"podIP": ip, "phase": "Running"},
    }


def deny_policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]},
    }


@contextmanager
def serve(fake: FakeKube | None = None, tls: ssl.SSLContext | None = None) -> Iterator[FakeKube]:
    kube = fake or FakeKube()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            auth = self.headers.get("Authorization") or ""
            token = auth[len("bearer ") :] if auth.lower().startswith("bearer ") else ""
            with kube.cond:
                kube.request_times.append(time.monotonic())
                kube.requests.append((method, url.path, query))
                kube.tokens_seen.append(token)
                refused = kube.accepted_tokens is not None and token not in kube.accepted_tokens
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if refused:
                self._send_json(401, status_object(401, "Unauthorized", "Unauthorized"))
                return
            if url.path in kube.forbidden:
                user = "system:serviceaccount:ambit-system:ambit-controller"
                self._send_json(403, status_object(403, "Forbidden", f"{user} cannot list resource at {url.path}"))
                return
            for m, pattern, handler in kube.routes:
                match = pattern.fullmatch(url.path)
                if m == method and match:
                    self._send_json(*handler(match, body))
                    return
            coll = kube.collections.get(url.path)
            if method != "GET" or coll is None:
                self._send_json(404, status_object(404, "NotFound", f"{method} {url.path} not found"))
                return
            if query.get("watch") == "true":
                with kube.cond:
                    watch_refused = kube.refuse_watches.pop(url.path, 0)
                if watch_refused:
                    self._send_json(watch_refused, status_object(watch_refused, "Expired", "too old resource version"))
                    return
                self._watch(coll, query)
                return
            with kube.cond:
                if kube.fail_lists > 0:
                    kube.fail_lists -= 1
                    retry_after = kube.fail_list_retry_after
                    self._send_json(
                        kube.fail_list_status,
                        status_object(kube.fail_list_status, "InternalError", "injected failure"),
                        {"Retry-After": retry_after} if retry_after else None,
                    )
                    return
                status, listing = kube.list_page(coll, query)
            self._send_json(status, listing)

        def _watch(self, coll: Collection, query: dict[str, str]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            stop = threading.Event()
            path = urlsplit(self.path).path
            with kube.cond:
                kube._watch_sockets[self.connection] = path
                short = kube.short_watches.get(path, 0) > 0
                if short:
                    kube.short_watches[path] -= 1
            try:
                if short:
                    stop.set()
                since = int(query.get("resourceVersion") or kube.resource_version)
                for event in kube.watch_events(coll, since, query.get("allowWatchBookmarks") == "true", stop):
                    line = json.dumps(event).encode() + b"\n"
                    with kube.cond:
                        cut = path in kube.cut_next_event
                        kube.cut_next_event.discard(path)
                    if cut:
                        line = line[: len(line) // 2]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    if cut and kube.end_mid_event:
                        break
                    if cut:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            finally:
                stop.set()
                with kube.cond:
                    kube._watch_sockets.pop(self.connection, None)
                self.close_connection = True

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    kube._server = server
    kube.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-kube", daemon=True)
    thread.start()
    try:
        yield kube
    finally:
        kube.drop_watches()
        server.shutdown()
        server.server_close()
