"""Incremental apply(): a change names exactly the resources it affects; deletes report None; no-ops report nothing."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest

from controller.model import KObject, ObjectKey, Pod, Service, ServiceEntry
from controller.translate import Delta, Translator
from controller.validation import parse_yaml_text

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec: {selector: {app: db}, clusterIP: 10.96.0.11, ports: [{port: 5432}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [demo]}}]}]
"""


def objects(text: str) -> list[KObject]:
    result = parse_yaml_text("t.yaml", text)
    assert result.errors == []
    return result.objects


def pods(count: int, app: str = "web", ns: str = "demo", node: str = "node-a") -> str:
    return "".join(
        f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {app}-{i}, namespace: {ns}, labels: {{app: {app}}}}}
spec: {{nodeName: {node}, serviceAccountName: {app}}}
status: {{podIP: 10.{1 if ns == "demo" else 2}.{0 if app == "web" else 1}.{i + 1}}}
"""
        for i in range(count)
    )


def setup() -> tuple[Translator, dict[ObjectKey, KObject]]:
    all_objects = objects(BASE + pods(3) + pods(2, app="db") + pods(2, ns="other"))
    translator = Translator()
    first = translator.apply(all_objects, [])
    assert len(first.addresses) == 2 + 7 and list(first.authorizations) == ["demo/web-allow"]
    return translator, {o.key: o for o in all_objects}


def relabel(pod: KObject, **labels: str) -> Pod:
    assert isinstance(pod, Pod)
    meta = dataclasses.replace(pod.meta, labels=MappingProxyType({**pod.meta.labels, **labels}))
    return dataclasses.replace(pod, meta=meta)


def test_noop_upsert_reports_nothing() -> None:
    t, by_key = setup()
    delta = t.apply(list(by_key.values()), [])
    assert delta == Delta() and not delta


def test_single_pod_change_names_only_that_pod() -> None:
    t, by_key = setup()
    delta = t.apply([relabel(by_key[ObjectKey("Pod", "demo", "web-1")], version="v2")], [])
    assert list(delta.addresses) == ["Kubernetes//Pod/demo/web-1"]
    assert delta.authorizations == {}
    address = delta.addresses["Kubernetes//Pod/demo/web-1"]
    assert address is not None and address.workload.canonical_revision == "v2"


def test_pod_moving_between_services_and_policies() -> None:
    t, by_key = setup()
    delta = t.apply([relabel(by_key[ObjectKey("Pod", "demo", "web-0")], app="db")], [])
    assert list(delta.addresses) == ["Kubernetes//Pod/demo/web-0"]
    moved = delta.addresses["Kubernetes//Pod/demo/web-0"]
    assert moved is not None
    assert list(moved.workload.services) == ["demo/db.demo.svc.cluster.local"]
    assert list(moved.workload.authorization_policies) == []


def test_delete_pod_reports_none_and_updates_node_identities() -> None:
    t, _ = setup()
    assert t.has_pod("node-a", "demo", "db")
    delta = t.apply([], [ObjectKey("Pod", "demo", "db-0"), ObjectKey("Pod", "demo", "db-1")])
    assert delta.addresses == {"Kubernetes//Pod/demo/db-0": None, "Kubernetes//Pod/demo/db-1": None}
    assert not t.has_pod("node-a", "demo", "db")
    assert t.pod_identities_on_node("node-a") == {("demo", "web"), ("other", "web")}
    assert "Kubernetes//Pod/demo/db-0" not in t.addresses()
    assert t.apply([], [ObjectKey("Pod", "demo", "db-0")]) == Delta()  # deleting again is a no-op


def test_namespace_enrollment_touches_only_its_pods() -> None:
    t, _ = setup()
    delta = t.apply(
        objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}"),
        [],
    )
    assert sorted(delta.addresses) == ["Kubernetes//Pod/other/web-0", "Kubernetes//Pod/other/web-1"]
    assert all(a is not None and a.workload.tunnel_protocol == 1 for a in delta.addresses.values())
    delta = t.apply([], [ObjectKey("Namespace", "", "demo")])
    assert len(delta.addresses) == 5
    assert all(a is not None and a.workload.tunnel_protocol == 0 for a in delta.addresses.values())


def test_service_delete_and_recreate() -> None:
    t, by_key = setup()
    delta = t.apply([], [ObjectKey("Service", "demo", "db")])
    assert delta.addresses.keys() == {
        "demo/db.demo.svc.cluster.local",
        "Kubernetes//Pod/demo/db-0",
        "Kubernetes//Pod/demo/db-1",
    }
    assert delta.addresses["demo/db.demo.svc.cluster.local"] is None
    recreated = t.apply([by_key[ObjectKey("Service", "demo", "db")]], [])
    assert len(recreated.addresses) == 3 and all(v is not None for v in recreated.addresses.values())


def test_service_vip_change_does_not_touch_workloads() -> None:
    t, _ = setup()
    changed = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n"
    changed += "spec: {selector: {app: web}, clusterIP: 10.96.0.99, ports: [{port: 80, targetPort: 8080}]}"
    delta = t.apply(objects(changed), [])
    assert list(delta.addresses) == ["demo/web.demo.svc.cluster.local"]


def test_policy_rule_change_touches_only_the_policy() -> None:
    t, _ = setup()
    changed = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [demo, other]}}]}]
"""
    delta = t.apply(objects(changed), [])
    assert list(delta.authorizations) == ["demo/web-allow"] and delta.addresses == {}


def test_policy_selector_change_and_delete() -> None:
    t, _ = setup()
    retarget = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: db}}
"""
    delta = t.apply(objects(retarget), [])
    assert list(delta.authorizations) == ["demo/web-allow"]
    assert sorted(delta.addresses) == [f"Kubernetes//Pod/demo/{n}" for n in ("db-0", "db-1", "web-0", "web-1", "web-2")]
    delta = t.apply([], [ObjectKey("AuthorizationPolicy", "demo", "web-allow")])
    assert delta.authorizations == {"demo/web-allow": None}
    assert sorted(delta.addresses) == ["Kubernetes//Pod/demo/db-0", "Kubernetes//Pod/demo/db-1"]


def test_unsupported_action_change_updates_warning_and_attachment() -> None:
    t, _ = setup()
    audit = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: AUDIT
"""
    delta = t.apply(objects(audit), [])
    assert delta.authorizations == {"demo/web-allow": None}
    assert len(delta.addresses) == 3
    assert list(t.warnings) == [ObjectKey("AuthorizationPolicy", "demo", "web-allow")]
    t.apply([], [ObjectKey("AuthorizationPolicy", "demo", "web-allow")])
    assert t.warnings == {}


def test_peer_authentication_lifecycle() -> None:
    t, _ = setup()
    mesh = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    mesh += "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}"
    delta = t.apply(objects(mesh), [])
    assert list(delta.authorizations) == ["istio-system/istio_converted_static_strict"]
    assert len(delta.addresses) == 7  # every workload gains the static policy; services are untouched
    delta = t.apply([], [ObjectKey("PeerAuthentication", "istio-system", "default")])
    assert delta.authorizations == {"istio-system/istio_converted_static_strict": None}
    assert len(delta.addresses) == 7


def test_full_state_matches_sum_of_deltas() -> None:
    t = Translator()
    state: dict[str, object] = {}
    steps: list[tuple[list[KObject], list[ObjectKey]]] = [
        (objects(BASE), []),
        (objects(pods(3)), []),
        ([], [ObjectKey("Service", "demo", "web")]),
        (objects(pods(1, app="db")), [ObjectKey("Pod", "demo", "web-2")]),
    ]
    for upserts, deletes in steps:
        delta = t.apply(upserts, deletes)
        for name, value in delta.addresses.items():
            if value is None:
                state.pop(name)
            else:
                state[name] = value
    assert state == t.addresses()
    assert sorted(state) == [
        "Kubernetes//Pod/demo/db-0",
        "Kubernetes//Pod/demo/web-0",
        "Kubernetes//Pod/demo/web-1",
        "demo/db.demo.svc.cluster.local",
    ]


def test_an_object_that_fails_to_build_does_not_block_later_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build failure used to leave the object in the dirty sets, so every later apply() raised again: one bad
    object (an IPv6 zone that validation let through did this) stopped all config changes."""
    t, by_key = setup()
    real = Translator._build_services

    def broken(self: Translator, obj: Service | ServiceEntry) -> dict[str, Any]:
        if obj.meta.name == "db":
            raise ValueError("cannot build")
        return real(self, obj)

    monkeypatch.setattr(Translator, "_build_services", broken)
    db = by_key[ObjectKey("Service", "demo", "db")]
    assert isinstance(db, Service)
    with pytest.raises(ValueError, match="cannot build"):
        t.apply([dataclasses.replace(db, cluster_ips=("10.96.0.99",))])
    moved = relabel(by_key[ObjectKey("Pod", "demo", "web-0")], version="v2")
    delta = t.apply([moved])
    assert list(delta.addresses) == ["Kubernetes//Pod/demo/web-0"]
