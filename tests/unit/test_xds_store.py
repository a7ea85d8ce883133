"""ConfigStore semantics: per-source contributions, last valid version, unattributable errors, duplicates."""

from __future__ import annotations

from typing import Any

import pytest

from controller.model import ObjectKey
from controller.monitoring import ControllerMetrics
from controller.store import ConfigStore, SourceError, SourceResult, error_key
from controller.translate import Delta, Translator
from controller.validation import ConfigError, parse_documents

NS = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}},
}


def pod(name: str, ip: str, sa: str = "default", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "uid": f"uid-{name}", "labels": {"app": name}},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa},
        "status": {"podIP": ip},
    }
    doc.update(extra)
    return doc


def parse(source: str, *docs: dict[str, Any]) -> Any:
    return parse_documents(source, list(docs))


def workload_names(translator: Translator) -> dict[str, str]:
    """name -> service account of every workload the translator serves."""
    out = {}
    for addr in translator.addresses().values():
        if addr.HasField("workload"):
            out[addr.workload.name] = addr.workload.service_account or "default"
    return out


@pytest.fixture
def store() -> ConfigStore:
    return ConfigStore(Translator(), ControllerMetrics())


def test_contribution_replaced_and_removed(store: ConfigStore) -> None:
    deltas: list[Delta] = []
    store.subscribe(deltas.append)
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "10.0.0.1"), pod("p2", "10.0.0.2"))})
    assert set(workload_names(store.translator)) == {"p1", "p2"}
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "10.0.0.1"))})
    assert set(workload_names(store.translator)) == {"p1"}
    assert any(v is None for v in deltas[-1].addresses.values())
    store.update({"a.yaml": None})
    assert workload_names(store.translator) == {}
    assert store.sources() == []


def test_invalid_object_keeps_last_valid_version(store: ConfigStore) -> None:
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "10.0.0.1", sa="first"))})
    bad = pod("p1", "not-an-ip", sa="second")
    result = parse("a.yaml", NS, bad)
    assert result.errors and error_key(result.errors[0]) == ObjectKey("Pod", "demo", "p1")
    store.update({"a.yaml": result})
    assert workload_names(store.translator) == {"p1": "first"}
    status = store.status()
    entry = status["objects"]["Pod/demo/p1"]
    assert entry["status"] == "rejected" and entry["serving"] == "last valid version"
    assert any("a.yaml:Pod/demo/p1: status.podIP" in e for e in entry["errors"]), entry
    assert store.metrics.config_errors._value.get() == len(result.errors)
    # Fixing it applies the new version and clears the error.
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "10.0.0.1", sa="third"))})
    assert workload_names(store.translator) == {"p1": "third"}
    assert store.errors() == []
    assert store.metrics.config_errors._value.get() == 0


def test_new_invalid_object_serves_nothing(store: ConfigStore) -> None:
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "bad"))})
    assert workload_names(store.translator) == {}
    assert store.status()["objects"]["Pod/demo/p1"]["serving"] == "nothing"


def test_unattributable_error_keeps_whole_previous_contribution(store: ConfigStore) -> None:
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "10.0.0.1"), pod("p2", "10.0.0.2"))})
    # A file that became unreadable (or has a YAML syntax error) contributes nothing new but removes nothing.
    store.update({"a.yaml": SourceResult(objects=[], errors=[SourceError("a.yaml", "cannot read: Permission denied")])})
    assert set(workload_names(store.translator)) == {"p1", "p2"}
    assert store.errors() == ["a.yaml: cannot read: Permission denied"]
    nameless = ConfigError("a.yaml", "?", "", "#2", "line 3", "invalid YAML: mapping values are not allowed here")
    store.update(
        {"a.yaml": SourceResult(objects=parse("a.yaml", NS, pod("p1", "10.0.0.9")).objects, errors=[nameless])}
    )
    assert set(workload_names(store.translator)) == {"p1", "p2"}
    ip = next(a.workload.addresses[0] for a in store.translator.addresses().values() if a.workload.name == "p1")
    assert ip == bytes([10, 0, 0, 9])


def test_duplicate_across_sources_first_wins_then_takes_over(store: ConfigStore) -> None:
    store.update({"a.yaml": parse("a.yaml", NS, pod("p1", "10.0.0.1", sa="from-a"))})
    store.update({"b.yaml": parse("b.yaml", pod("p1", "10.0.0.1", sa="from-b"))})
    assert workload_names(store.translator) == {"p1": "from-a"}
    errors = store.errors()
    assert errors == ["b.yaml:Pod/demo/p1: metadata.name: duplicate of the object in a.yaml"]
    assert store.metrics.config_errors._value.get() == 1
    # a.yaml drops it: b.yaml's version takes over.
    store.update({"a.yaml": parse("a.yaml", NS)})
    assert workload_names(store.translator) == {"p1": "from-b"}
    assert store.errors() == []


def test_batch_of_sources_applies_once(store: ConfigStore) -> None:
    deltas: list[Delta] = []
    store.subscribe(deltas.append)
    store.update({"ns.yaml": parse("ns.yaml", NS), "pods.yaml": parse("pods.yaml", pod("p1", "10.0.0.1"))})
    assert len(deltas) == 1
    assert store.generation == 1
    store.update({"ns.yaml": parse("ns.yaml", NS)})  # unchanged content: no new delta
    assert len(deltas) == 1
