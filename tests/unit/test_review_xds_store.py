"""ConfigStore: one update that moves an object between sources (a ConfigMap update moving a document from one key
to another, applied in one pass) hands it over without calling it a duplicate."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from controller.monitoring import ControllerMetrics
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_documents

NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}


def pod(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "uid": f"uid-{name}"},
        "spec": {"nodeName": "node-a"},
        "status": {"podIP": ip},
    }


def test_an_object_moved_between_sources_in_one_update_is_no_duplicate(caplog: pytest.LogCaptureFixture) -> None:
    store = ConfigStore(Translator(), ControllerMetrics())
    store.update({"b.yaml": parse_documents("b.yaml", [NS, pod("p1", "10.0.0.1")])})
    with caplog.at_level(logging.WARNING, logger="ambit.controller.config"):
        # The new owner comes first in the batch, as a sorted directory scan hands it over.
        store.update(
            {
                "a.yaml": parse_documents("a.yaml", [pod("p1", "10.0.0.2")]),
                "b.yaml": parse_documents("b.yaml", [NS]),
            }
        )
    assert not [r for r in caplog.records if "duplicate" in r.getMessage()]
    status = store.status()
    assert status["objects"]["Pod/demo/p1"]["source"] == "a.yaml"
    assert store.errors() == []
    ips = [a.workload.addresses[0] for a in store.translator.addresses().values() if a.HasField("workload")]
    assert ips == [bytes([10, 0, 0, 2])]


def test_a_real_duplicate_in_one_update_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    store = ConfigStore(Translator(), ControllerMetrics())
    with caplog.at_level(logging.WARNING, logger="ambit.controller.config"):
        store.update(
            {
                "a.yaml": parse_documents("a.yaml", [NS, pod("p1", "10.0.0.1")]),
                "b.yaml": parse_documents("b.yaml", [pod("p1", "10.0.0.2")]),
            }
        )
    assert [r for r in caplog.records if "duplicate" in r.getMessage()]
    assert store.errors() == ["b.yaml:Pod/demo/p1: metadata.name: duplicate of the object in a.yaml"]
