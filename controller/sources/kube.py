"""Config from the Kubernetes API: list + watch per resource with the official ``kubernetes`` client.

Per resource: list (in pages, remembering ``metadata.resourceVersion``), then watch from that version with
bookmarks; a watch that ends (server timeout, dropped connection) resumes from the last version seen, after the
backoff if it ended within a second without an event; a 410 Gone (as an ``ERROR`` event or an HTTP status) means
the version was compacted away, so the resource is listed again, after the backoff, and the store gets the
difference. "Too large resource version" (the server's store is behind the version: an etcd restore) is listed
again too, after the backoff. A kind the API does not serve at its version is tried at the older one (Istio's
v1beta1), then counts as empty until its CustomResourceDefinition is Established: CRDs are watched too (istiod's
CRD watcher, pkg/kube/kclient/crdwatcher.go), and a missing kind is polled for (every 30-60 s) only while CRDs
cannot be read (RBAC). Every retry, and a 404 on a version that stopped being served, starts again from the
preferred version, so CRDs installed or upgraded later are found. Other errors back off exponentially as
client-go's reflector does (0.8 s doubling to 30 s, each wait up to twice that at random, back to 0.8 s after two
minutes without one), and at least as long as an error response's Retry-After asks (urllib3's default Retry
already waits it out itself for 429 and 503).

The ``kubernetes`` client is blocking (urllib3), and a watch blocks in a socket read for minutes. Each watch
therefore runs in its own daemon thread: the default executor behind ``asyncio.to_thread`` has only a few
workers (cores + 4) and a never-ending watch per resource would starve every other ``to_thread`` user in the
process. Threads do HTTP, JSON decoding and validation (pure, and CPU in proportion to a list: on the loop, a
relist of every pod of a large cluster stalled it for seconds); all state changes happen on the event loop through
``loop.call_soon_threadsafe``. Objects are fed to validation as the plain JSON dicts the API server sent, the
same shape as YAML documents from the file source, validated with ``strict=False`` because the API server has
already checked them and may serve fields newer than this code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from common.log import kv
from controller.store import STEP_SECONDS, STEP_SOURCES, ConfigStore, Contribution
from controller.validation import parse_documents

log = logging.getLogger("ambit.controller.kube")

SOURCE_LABEL = "kube"  # what error messages name as the source: "kube:Pod/ns/name: field: reason"
# Lists are read in pages of this many objects (client-go's tools/pager defaultPageSize): an unpaged list of every pod
# of a large cluster is one response the API server must build within its request timeout and hold in memory.
LIST_PAGE_SIZE = 500
# The API server ends a watch after the timeout it is asked for, between this and twice it at random (client-go's
# reflector: minWatchTimeout * (rand + 1)), so that the watches of every resource and replica do not all end and
# come back in the same second; we resume from the last version.
WATCH_TIMEOUT_SECONDS = 300
# A watch that ends sooner than this without one event is a failure (backed off), not a watch to resume at once: an
# API server shutting down, or a proxy before it, may end every watch as soon as it starts, and resuming each at
# once would be a tight loop of requests against it (client-go's reflector watchHandler: "very short watch").
SHORT_WATCH_SECONDS = 1.0
RETRY_AFTER_MAX = 60.0  # a Retry-After longer than this is waited for this long: a broken header must not stall us
# client-go's reflector backoff (tools/cache/reflector.go NewReflectorWithOptions:
# wait.NewExponentialBackoffManager(800ms, 30s, 2m, 2.0, 1.0)): the first wait 0.8 s, doubling to 30 s, each wait up to
# twice that at random, and back to 0.8 s once two minutes passed without one.
BACKOFF_INITIAL = 0.8
BACKOFF_MAX = 30.0
BACKOFF_RESET = 120.0


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    version: str = "v1"
    group: str = ""  # "" is the core API group
    older: str = ""  # a version to fall back to when the API does not serve ``version`` (older Istio CRDs)
    crd: bool = False  # defined by a CustomResourceDefinition, which may be installed (or removed) at any time

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def crd_name(self) -> str:
        """The name of the CustomResourceDefinition that defines it ("its name MUST be <plural>.<group>")."""
        return f"{self.plural}.{self.group}"

    @property
    def path(self) -> str:
        return f"/api/{self.version}/{self.plural}" if not self.group else f"/apis/{self.api_version}/{self.plural}"


RESOURCES = (
    Resource("Namespace", "namespaces"),
    Resource("Node", "nodes"),
    Resource("Pod", "pods"),
    Resource("Service", "services"),
    # Built in, but outside the core group: read through the generic API like the CRDs (same path and JSON).
    Resource("EndpointSlice", "endpointslices", "v1", group="discovery.k8s.io"),
    Resource("ServiceEntry", "serviceentries", "v1", older="v1beta1", group="networking.istio.io", crd=True),
    Resource("WorkloadEntry", "workloadentries", "v1", older="v1beta1", group="networking.istio.io", crd=True),
    Resource(
        "AuthorizationPolicy", "authorizationpolicies", "v1", older="v1beta1", group="security.istio.io", crd=True
    ),
    Resource("PeerAuthentication", "peerauthentications", "v1", older="v1beta1", group="security.istio.io", crd=True),
)
# Watched so that a kind whose CRD is installed after the start is listed as soon as the CRD is Established, as
# istiod's CRD watcher starts its informers (pkg/kube/kclient/crdwatcher.go), rather than found by a poll.
CRDS = Resource("CustomResourceDefinition", "customresourcedefinitions", "v1", group="apiextensions.k8s.io")


class WatchExpired(Exception):
    """410 Gone: the resource version is too old; list again."""


class WatchError(Exception):
    """An ERROR event other than 410, or a malformed event."""


# A watch idles in a socket read for minutes. An API server (or a load balancer in front) that vanishes without a
# FIN or RST (a node lost, a flow dropped) was noticed only by the read timeout, the watch timeout + 30 s (5.5 to
# 10.5 min) with no change of that kind reaching the agents; TCP keepalive notices within about a minute (client-go
# pings its HTTP/2 connections for the same reason). (option name, value): idle seconds, probe interval, probes.
KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def socket_options() -> list[tuple[int, int, int]]:
    """urllib3's own default (no Nagle), plus keepalive with the timings above where the platform has them."""
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    options += [(socket.IPPROTO_TCP, getattr(socket, name), v) for name, v in KEEPALIVE if hasattr(socket, name)]
    return options


def api_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient from a kubeconfig file, or in-cluster config when none is given; its sockets keep alive."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.socket_options = socket_options()
    # Each resource's watch holds a connection; the default pool (cpu_count * 5) is smaller than the watches on a
    # one-CPU node, and urllib3 closes what does not fit at each watch's end: a new handshake for the next request.
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, len(RESOURCES) + 3)  # + the CRD watch
    return client.ApiClient(configuration=cfg)


def jittered(seconds: float) -> float:
    """A wait between ``seconds`` and twice it (client-go's backoff jitter 1.0): when the API server restarts, every
    resource of every replica fails in the same instant, and waits without jitter would bring them all back in the
    same instant again, at each step of the backoff."""
    return seconds * (1.0 + random.random())


class Backoff:
    """The waits between a resource's failed attempts, as client-go's reflector paces them (apimachinery wait's
    exponentialBackoffManagerImpl): each wait is the current step jittered up to twice it, the step doubles up to
    ``cap``, and it starts over from ``initial`` when ``reset_after`` seconds passed since the last wait began. It is
    not reset by a success: a server that fails every attempt soon after accepting it keeps being backed off from,
    where a reset on each success would retry it every 0.8 s for ever."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        cap: float = BACKOFF_MAX,
        reset_after: float = BACKOFF_RESET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.reset_after = reset_after
        self.step = initial
        self._clock = clock
        self._last = clock()

    def next(self) -> float:
        """The seconds to wait now; moves the backoff on."""
        now = self._clock()
        if now - self._last > self.reset_after:
            self.step = self.initial
        self._last = now
        wait = jittered(self.step)
        self.step = min(self.cap, self.step * 2.0)
        return wait


def retry_after(error: Any) -> float:
    """The seconds an error response's Retry-After header asks to wait (0 without one; at most RETRY_AFTER_MAX).

    client-go's REST client waits that long after a 429 or any 5xx (rest/with_retry.go checkWait); urllib3's
    default Retry does it only for 413, 429 and 503, so a 500 or 504 (a timeout) carrying it was retried after our
    own backoff, from 0.2 s, sooner than the server asked.
    """
    headers = getattr(error, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(RETRY_AFTER_MAX, max(0.0, float(value))) if value else 0.0
    except (TypeError, ValueError):  # an HTTP date, which the API server never sends: our own backoff then
        return 0.0


def source_id(kind: str, obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"kube:{kind}/{meta.get('namespace', '')}/{meta.get('name', '')}"


def validate(kind: str, obj: dict[str, Any]) -> Contribution | None:
    """``obj`` as the store takes it, or None (logged) when validation itself raised: a bug, never an invalid object
    (those come back as errors in the contribution), which must not end the watch of the kind."""
    try:
        return parse_documents(SOURCE_LABEL, [obj], strict=False)
    except Exception:
        log.exception("validating a kube object failed", extra=kv(object=source_id(kind, obj)))
        return None


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Watch events are newline-delimited JSON; chunk boundaries fall anywhere."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def too_large_version(status: Any) -> bool:
    """Whether a ``Status`` (an ERROR event's object, or an error response's body) says "Too large resource version"
    (504, cause ResourceVersionTooLarge): the API server's store is behind the version the watch resumes from, as
    after an etcd restore or behind a lagging API server. Retrying that version would be refused until the store
    caught up, which after a restore never happens: only a fresh list goes on (client-go's reflector relists)."""
    if not isinstance(status, dict):
        return False
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    if isinstance(causes, list) and any(
        isinstance(c, dict) and c.get("reason") == "ResourceVersionTooLarge" for c in causes
    ):
        return True
    message = status.get("message")  # API servers before 1.19 sent no cause
    return isinstance(message, str) and "too large resource version" in message.lower()


def _json(body: Any) -> Any:
    """An error response's body as JSON, or None."""
    try:
        return json.loads(body) if isinstance(body, (str, bytes)) else None
    except ValueError:
        return None


def _check_object(obj: Any, what: str) -> None:
    """Raise WatchError unless ``obj`` is a JSON object whose metadata (if any) is one: what the code after it reads."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata") or {}, dict):
        raise WatchError(f"malformed {what}: {json.dumps(obj)[:200]}")


class _Body:
    """A watch response's chunks, noting whether the body ended in the middle of a line (``cut``): every event the
    API server sends ends with a newline, so anything after the last one is an event cut short.

    :meth:`close` must come before the connection goes back to the pool: closing urllib3's stream before its end
    closes the connection, which otherwise would be handed to the next request with the watch still streaming
    into it (that request then waits for an answer that never comes, up to the read timeout).
    """

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self._last = b"\n"
        self.cut = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if chunk:
                self._last = chunk
            yield chunk
        self.cut = not self._last.endswith(b"\n")

    def close(self) -> None:
        self._chunks.close()


class _Watcher:
    """List + watch of one resource, in a thread; reports to :class:`KubeSource` on the loop."""

    def __init__(self, source: KubeSource, resource: Resource) -> None:
        self.source = source
        self.resource = resource
        self.preferred = resource  # what a retry after "not served" asks for first: CRDs may be installed since
        self.stopped = threading.Event()
        self.wake = threading.Event()  # set when the resource's CRD may have become served, and on stop
        self.resource_version = ""
        self.backoff = Backoff(source.backoff_initial, source.backoff_max)
        self.missing = False
        self.listed = False  # a list of this resource has been applied since start
        self._response: Any = None
        self.thread = threading.Thread(target=self._run, name=f"kube-watch-{resource.plural}", daemon=True)

    def _request(self, **kwargs: Any) -> Any:
        from kubernetes import client

        r = self.resource
        common = {"_preload_content": False, "_request_timeout": (10, WATCH_TIMEOUT_SECONDS + 30), **kwargs}
        if r.group:
            api = client.CustomObjectsApi(self.source.api)
            return api.list_cluster_custom_object(r.group, r.version, r.plural, **common)
        core = client.CoreV1Api(self.source.api)
        call = {
            "namespaces": core.list_namespace,
            "nodes": core.list_node,
            "pods": core.list_pod_for_all_namespaces,
            "services": core.list_service_for_all_namespaces,
        }[r.plural]
        return call(**common)

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        while not self.stopped.is_set():
            try:
                if not self.resource_version:
                    self._list()
                self._watch()
            except WatchExpired:
                self._expired()
            except ApiException as e:
                self._api_error(e)
                if e.status == 410:
                    self._expired()
                elif too_large_version(_json(e.body)):
                    self.resource_version = ""  # listed afresh after the backoff: a lagging server may catch up
                    self._failed(f"HTTP {e.status}: {e.reason}", retry_after(e))
                elif e.status == 404 and not self.resource_version and self.resource.older:
                    log.log(
                        logging.DEBUG if self.missing else logging.INFO,
                        "kube resource version not served; trying the older one",
                        extra=kv(resource=self.resource.path, older=self.resource.older),
                    )
                    self.resource = dataclasses.replace(self.resource, version=self.resource.older, older="")
                elif e.status == 404 and not self.resource_version:
                    self._missing()
                elif e.status == 404:
                    # No longer served at this version (CRDs upgraded, or removed): list afresh from the preferred one.
                    self.resource_version = ""
                    self.resource = self.preferred
                    self._failed(f"HTTP {e.status}: {e.reason}", retry_after(e))
                else:
                    self._failed(f"HTTP {e.status}: {e.reason}", retry_after(e))
            except (HTTPError, OSError, ValueError, WatchError) as e:
                self._failed(f"{type(e).__name__}: {e}")
            except Exception as e:  # a client bug or an answer of a shape never seen must not end this watch
                log.exception("kube list/watch failed unexpectedly", extra=kv(resource=self.resource.plural))
                self._failed(f"{type(e).__name__}: {e}")

    def _api_error(self, error: Any) -> None:
        """Told of every API error before the common handling below."""

    def _missing(self) -> None:
        """The API does not serve this resource (e.g. Istio's CRDs are not installed): it has no objects.

        At start it counts as an empty list, so that start-up completes; tried again once its CRD is Established
        (:meth:`_wait_until_served`). A resource that was served before keeps its objects: a deleted CRD's objects
        were deleted (and watched as such) before it went, so only a transient 404 (an API server still starting)
        is left, and that must not take every policy of the kind away from the agents.
        """
        if not self.missing:
            self.missing = True
            if self.listed:
                log.warning(
                    "kube resource no longer served; keeping its objects", extra=kv(resource=self.resource.path)
                )
            else:
                log.warning("kube resource not served; treating it as empty", extra=kv(resource=self.resource.path))
                self.source.from_thread(self.source.relisted, self.resource, {})
        # Ask for the preferred version again, not the older one that was tried last: CRDs installed meanwhile may
        # serve only the newer one.
        self.resource = self.preferred
        self._wait_until_served()

    def _wait_until_served(self) -> None:
        """Wait until the resource may be served: its CRD Established at one of our versions (told by the CRD
        watch, which sets ``wake``), as istiod starts a kind's informer from its CRD watcher. Established already
        (the API server serves it a moment later, or at a version we tried before it was): again after the backoff.
        While CRDs cannot be read (before the CRD watch's first list, or when RBAC does not grant it), or for a kind
        no CRD defines: again after backoff_max (30 to 60 s), the poll the CRD watch replaces."""
        crds = self.source.crds
        if not self.resource.crd or crds is None:
            self.stopped.wait(jittered(self.source.backoff_max))
            return
        self.wake.clear()  # before the look: a CRD event after it sets it again
        served = crds.served(self.resource.crd_name)
        if served & {self.resource.version, self.resource.older}:
            self.stopped.wait(self.backoff.next())
            return
        log.debug("kube resource waits for its CRD", extra=kv(crd=self.resource.crd_name, polling=crds.polling))
        self.wake.wait(jittered(self.source.backoff_max) if crds.polling else None)

    def _expired(self) -> None:
        """410 Gone: the version was compacted away; list again, after the backoff. client-go's reflector ends
        ListAndWatch there and its Run loop (wait.BackoffUntil with the backoff manager) waits before the next list:
        a compaction expires the watches of every resource of every replica at once, and relisting all of them in
        the same instant is a burst of full lists against an API server that just compacted."""
        self.resource_version = ""
        if self.stopped.is_set():
            return
        wait = self.backoff.next()
        log.info(
            "kube watch expired (410); listing again", extra=kv(resource=self.resource.plural, list_in=round(wait, 3))
        )
        self.stopped.wait(wait)

    def _failed(self, error: str, at_least: float = 0.0) -> None:
        if self.stopped.is_set():
            return
        wait = max(self.backoff.next(), at_least)
        log.warning(
            "kube list/watch failed; retrying",
            extra=kv(resource=self.resource.plural, error=error, retry_in=round(wait, 3)),
        )
        self.stopped.wait(wait)

    def _list(self) -> None:
        """The whole list, read in pages of ``page_size``, to the store at once: the pages are one snapshot (etcd
        serves every page at the first one's revision), which the store gets only whole, never a page of it.

        A continue token that outlived etcd's compaction (a slow reader of a large list) is answered 410 Expired;
        the list is then read again in one request, as client-go's pager does (FullListIfExpired): starting over
        in pages could expire again each time.
        """
        from kubernetes.client.exceptions import ApiException

        paging = {"limit": self.source.page_size} if self.source.page_size > 0 else {}
        body = self._list_page(**paging)
        items = list(body["items"])
        while token := str((body.get("metadata") or {}).get("continue") or ""):
            try:
                body = self._list_page(**paging, _continue=token)
            except ApiException as e:
                if e.status != 410:
                    raise
                log.info(
                    "kube list continue token expired; listing in one request", extra=kv(resource=self.resource.plural)
                )
                body = self._list_page()
                items = []
            items += body["items"]
        self.missing = False
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        self.listed = True
        self._listed(items)

    def _listed(self, items: list[dict[str, Any]]) -> None:
        """A whole list, validated here (in the thread), to the store on the loop."""
        kind = self.resource.kind
        parsed = {source_id(kind, item): validate(kind, item) for item in items}
        self.source.from_thread(self.source.relisted, self.resource, parsed)

    def _list_page(self, **params: Any) -> dict[str, Any]:
        resp = self._request(**params)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        if not isinstance(body, dict) or not isinstance(body.get("items") or [], list):
            raise WatchError(f"malformed list of {self.resource.plural}: not an object with an items list")
        body["items"] = body.get("items") or []
        for item in body["items"]:
            _check_object(item, "list item")
            # List items of built-in kinds come without kind/apiVersion.
            item.setdefault("kind", self.resource.kind)
            item.setdefault("apiVersion", self.resource.api_version)
        return body

    def watch_timeout(self) -> int:
        return int(WATCH_TIMEOUT_SECONDS * (1.0 + random.random()))

    def _watch(self) -> None:
        from urllib3.exceptions import HTTPError

        timeout = self.watch_timeout()
        resp = self._request(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(10, timeout + 30),
        )
        self._response = resp
        started, events = time.monotonic(), 0
        body = _Body(resp.stream(decode_content=True))
        try:
            for line in iter_lines(body):
                if self.stopped.is_set():
                    return
                if body.cut:
                    # The body ended in the middle of an event (a proxy relaying a lost connection ends it cleanly):
                    # the half line is no event, and resuming from the last whole one brings the event again.
                    log.info(
                        "kube watch ended in the middle of an event; resuming", extra=kv(resource=self.resource.plural)
                    )
                    break
                self._event(line)
                events += 1
        except (HTTPError, OSError) as e:
            # The stream broke (connection lost or reset, a read timeout). client-go's StreamWatcher ends the watch
            # there and the reflector watches again at once from the last version (tools/cache/reflector.go watch:
            # handleWatch returns no error unless the watch was very short): no backoff for a watch that ran.
            if self.stopped.is_set() or (not events and time.monotonic() - started < SHORT_WATCH_SECONDS):
                raise
            log.info(
                "kube watch stream broken; resuming",
                extra=kv(resource=self.resource.plural, error=f"{type(e).__name__}: {e}"),
            )
        finally:
            self._response = None
            body.close()
            resp.release_conn()
        if not events and time.monotonic() - started < SHORT_WATCH_SECONDS and not self.stopped.is_set():
            raise WatchError(f"very short watch: the server ended it within {SHORT_WATCH_SECONDS:g} s, no event")

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind, obj = event["type"], event["object"]
            _check_object(obj, "watch event object")
        except (ValueError, KeyError, TypeError, WatchError) as e:
            # Resuming would be answered with the same event again: list afresh instead (after the backoff).
            self.resource_version = ""
            raise WatchError(f"malformed watch event: {e}") from None
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(obj.get("message", "expired"))
            if too_large_version(obj):
                self.resource_version = ""  # listed afresh after the backoff: a lagging server may catch up
            raise WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return
        obj.setdefault("kind", self.resource.kind)
        obj.setdefault("apiVersion", self.resource.api_version)
        self._changed(kind, obj)

    def _changed(self, kind: str, obj: dict[str, Any]) -> None:
        """A watch event, validated here (in the thread), to the store on the loop."""
        contribution = None
        if kind in ("ADDED", "MODIFIED"):
            contribution = validate(self.resource.kind, obj)
            if contribution is None:
                return  # validation raised (logged): this event is lost, the watch goes on
        self.source.from_thread(
            self.source.changed, self.resource, kind, source_id(self.resource.kind, obj), contribution
        )

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        resp = self._response
        if resp is not None:
            with contextlib.suppress(OSError, AttributeError):
                resp.shutdown()  # unblocks the read in the watch thread


class _CrdWatcher(_Watcher):
    """List + watch of CustomResourceDefinitions: which of the CRDs the watched kinds need are Established, and at
    which versions they are served. Its own state, kept in its thread; the watchers waiting for a CRD read it and
    are woken when it changes (nothing goes to the store).

    Whole CRDs, not their metadata only (istiod's watcher reads metadata): Established is in the status. A list is
    read once per start or 410, in pages; CRDs change rarely, so the watch is quiet.
    """

    def __init__(self, source: KubeSource, watchers: list[_Watcher]) -> None:
        super().__init__(source, CRDS)
        self.thread.name = "kube-watch-crds"
        self._waiting = {w.resource.crd_name: w for w in watchers if w.resource.crd}
        self._lock = threading.Lock()
        self._served: dict[str, frozenset[str]] = {}  # CRD name -> versions served, for the Established ones
        self.polling = True  # no list of CRDs yet, or reading them was refused: the waiting watchers poll
        self.refused = False  # the last request was refused (401/403)

    def served(self, name: str) -> frozenset[str]:
        """The versions the CRD ``name`` serves, if it is Established (else none)."""
        with self._lock:
            return self._served.get(name, frozenset())

    def _api_error(self, error: Any) -> None:
        """401/403 (RBAC does not grant reading CRDs): the waiting watchers poll until a list succeeds; the error is
        then handled as for any resource (retried after the backoff, in case the grant comes)."""
        if getattr(error, "status", None) not in (401, 403):
            return
        if not self.refused:
            self.refused = True
            log.warning(
                "kube CRDs cannot be read; a kind whose CRD is missing is looked for every 30-60 s",
                extra=kv(error=f"HTTP {error.status}: {error.reason}"),
            )
        self._polling(True)

    def _polling(self, on: bool) -> None:
        if on == self.polling:
            return
        self.polling = on
        for w in self._waiting.values():
            w.wake.set()  # to wait again, now with (or without) the poll's timeout

    def _missing(self) -> None:
        # CRDs are always served (apiextensions.k8s.io/v1 since Kubernetes 1.16); a 404 is an API server starting.
        self._failed("HTTP 404: CustomResourceDefinitions not served")

    def _listed(self, items: list[dict[str, Any]]) -> None:
        served: dict[str, frozenset[str]] = {}
        for item in items:
            entry = _crd_entry(item)
            if entry is not None and entry[0] in self._waiting and entry[1]:
                served[entry[0]] = entry[1]
        with self._lock:
            before, self._served = self._served, served
        if self.refused:
            log.info("kube CRDs read: a kind whose CRD is missing is listed once its CRD is Established")
        self.refused = False
        self._polling(False)
        for name, versions in served.items():
            if before.get(name) != versions:
                self._waiting[name].wake.set()

    def _changed(self, kind: str, obj: dict[str, Any]) -> None:
        entry = _crd_entry(obj)
        if entry is None or entry[0] not in self._waiting:
            return
        name, versions = entry
        with self._lock:
            before = self._served.get(name)
            if kind == "DELETED" or not versions:
                self._served.pop(name, None)
            else:
                self._served[name] = versions
        if versions and kind != "DELETED" and before != versions:
            log.info("kube CRD established", extra=kv(crd=name, versions=sorted(versions)))
            self._waiting[name].wake.set()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _crd_entry(crd: dict[str, Any]) -> tuple[str, frozenset[str]] | None:
    """(name, versions it serves) of a CustomResourceDefinition; no versions unless it is Established (the API
    server serves a CRD's resource once it is: NamesAccepted, then Established)."""
    meta = crd.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str):
        return None
    spec = _dict(crd.get("spec"))
    conditions = _dict(crd.get("status")).get("conditions")
    established = isinstance(conditions, list) and any(
        isinstance(c, dict) and c.get("type") == "Established" and c.get("status") == "True" for c in conditions
    )
    versions = spec.get("versions")
    served = frozenset(
        v["name"]
        for v in (versions if isinstance(versions, list) else [])
        if isinstance(v, dict) and isinstance(v.get("name"), str) and v.get("served")
    )
    return name, served if established else frozenset()


class KubeSource:
    """Every watched object is its own source in the store (``kube:<Kind>/<ns>/<name>``).

    A list of more than ``step`` changes goes to the store in steps (:meth:`ConfigStore.update_in_steps`): a relist
    of every pod of a large cluster held the event loop for seconds in one ``store.update`` (measured: 2.0 s for
    10,000 new pods, 0.23 s for 10,000 unchanged ones). Lists and events reach the store in the order the watches
    delivered them: whatever arrives while a list is being applied waits for it (an event after the list is newer
    than the list's version of its object)."""

    def __init__(
        self,
        store: ConfigStore,
        api: Any,
        resources: tuple[Resource, ...] = RESOURCES,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        page_size: int = LIST_PAGE_SIZE,
        step: int = STEP_SOURCES,
        step_budget: float = STEP_SECONDS,
    ) -> None:
        self.store = store
        self.page_size = page_size  # 0: lists in one request
        self.api = api
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.step = step
        self.step_budget = step_budget
        self.resources = resources
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers = [_Watcher(self, r) for r in resources]
        # None when no watched kind is defined by a CRD: nothing to wait for.
        self.crds = _CrdWatcher(self, self._watchers) if any(r.crd for r in resources) else None
        self._known: dict[str, set[str]] = {r.kind: set() for r in resources}  # by kind: versions may change
        self._synced: dict[str, asyncio.Event] = {}
        self._applying: asyncio.Task[None] | None = None  # a list going to the store in steps
        self._backlog: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._stopped = False
        self.lists = 0
        self.events = 0

    async def start(self) -> None:
        """Start every watch; returns once each resource's first list has been applied (retrying until then)."""
        self._loop = asyncio.get_running_loop()
        self._synced = {r.kind: asyncio.Event() for r in self.resources}
        for w in self._watchers:
            w.thread.start()
        if self.crds is not None:
            self.crds.thread.start()
        for kind, event in self._synced.items():
            await event.wait()
            log.info("kube resource synced", extra=kv(kind=kind, objects=len(self._known[kind])))

    def stop(self) -> None:
        self._stopped = True
        for w in self._watchers:
            w.stop()
        if self.crds is not None:
            self.crds.stop()
        self._backlog.clear()
        if self._applying is not None:
            self._applying.cancel()

    async def idle(self) -> None:
        """Wait until every list and event handed over so far is in the store (tests, measurements)."""
        while self._applying is not None:
            await asyncio.shield(self._applying)

    def from_thread(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed between the check and the call (shutdown).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.submit, fn, *args)

    # ---- on the event loop ---------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` (:meth:`relisted` or :meth:`changed`) now, or after the list being applied in steps."""
        if self._stopped:
            return
        if self._applying is not None or self._backlog:
            self._backlog.append((fn, args))
            return
        fn(*args)

    def relisted(self, resource: Resource, parsed: dict[str, Contribution | None]) -> None:
        """A full list, validated (by source id): upsert everything in it, remove what is gone since the last list.
        A None (validation raised, logged) keeps the store as it was: the list without that object would delete it.
        More than ``step`` changes are applied in steps, by a task; what is submitted meanwhile waits for it."""
        self.lists += 1
        stepped = False
        try:
            if any(c is None for c in parsed.values()):
                log.error(
                    "kube list not applied: validating one of its objects failed", extra=kv(resource=resource.plural)
                )
                return
            changes = dict(parsed)
            for sid in self._known[resource.kind] - parsed.keys():
                changes[sid] = None
            self._known[resource.kind] = set(parsed)
            if len(changes) > self.step:
                self._applying = asyncio.get_running_loop().create_task(
                    self._apply_in_steps(resource, changes), name=f"kube-list-{resource.plural}"
                )
                stepped = True
            else:
                self.store.update(changes)
        except Exception as e:  # the store keeps what it had; start() must not wait for this resource forever
            log.error(
                "applying a kube list failed", extra=kv(resource=resource.plural, objects=len(parsed), error=repr(e))
            )
        finally:
            if not stepped:
                self._list_applied(resource)

    async def _apply_in_steps(self, resource: Resource, changes: dict[str, Contribution | None]) -> None:
        started = time.monotonic()
        try:
            await self.store.update_in_steps(changes, self.step, self.step_budget)
            log.debug(
                "kube list applied in steps",
                extra=kv(resource=resource.plural, changes=len(changes), seconds=round(time.monotonic() - started, 3)),
            )
        except Exception as e:  # as relisted: logged, and the resource still counts as synced
            log.error(
                "applying a kube list failed", extra=kv(resource=resource.plural, objects=len(changes), error=repr(e))
            )
        finally:
            self._applying = None
            self._list_applied(resource)
            if not self._stopped:
                self._drain()

    def _drain(self) -> None:
        """What was submitted while a list was applied in steps, in order, until another list needs steps."""
        while self._backlog and self._applying is None and not self._stopped:
            fn, args = self._backlog.popleft()
            try:
                fn(*args)
            except Exception:  # one bad event must not keep the rest from the store (as a loop callback raising)
                log.exception("applying a kube change failed", extra=kv(change=getattr(fn, "__name__", str(fn))))

    def _list_applied(self, resource: Resource) -> None:
        if resource.kind in self._synced:
            self._synced[resource.kind].set()

    def changed(self, resource: Resource, event_type: str, sid: str, contribution: Contribution | None) -> None:
        """A watch event of the object ``sid``, validated when ADDED or MODIFIED."""
        self.events += 1
        if event_type == "DELETED":
            self._known[resource.kind].discard(sid)
            self.store.update({sid: None})
        elif event_type in ("ADDED", "MODIFIED") and contribution is not None:
            self._known[resource.kind].add(sid)
            self.store.update({sid: contribution})
        else:
            log.warning("unknown watch event type ignored", extra=kv(resource=resource.plural, type=event_type))
