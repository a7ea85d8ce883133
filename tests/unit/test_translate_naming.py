"""A pod's `workload_name` (the agent's source_workload/destination_workload metric labels and access log field) and
canonical service/revision, as istiod derives them (istio/istio 86c9f01, the reference snapshot):
pilot/pkg/serviceregistry/ambient/workloads.go `workloadName` = pkg/kube/util.go `GetWorkloadMetaFromPod`
(the `service.istio.io/workload-name` label, else `GetDeployMetaFromPod`'s heuristics on the controlling owner
reference), canonical names from pkg/kube/labels `CanonicalService`. Since Istio 1.25 (#55032) every pod's
`workload_type` is POD: ztunnel reads it only for the `k8s.<type>.name` baggage key.

The name must be stable across a controller's pods and runs: a name per pod (or per CronJob run) is a new Prometheus
series for every pod (or run), kept forever."""

from __future__ import annotations

from typing import Any

import pytest

from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_documents

NAMESPACE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}},
}


def pod(name: str, owner: tuple[str, str] | None, labels: dict[str, str], generate_name: str = "") -> dict[str, Any]:
    """A pod as its controller creates it: a generated name and one owner reference with controller: true."""
    meta: dict[str, Any] = {"name": name, "namespace": "demo", "labels": labels}
    if owner is not None:
        kind, owner_name = owner
        meta["generateName"] = generate_name or f"{owner_name}-"
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": kind, "name": owner_name, "uid": "u1", "controller": True}
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
        "status": {"podIP": "10.1.0.7"},
    }


def translated(*docs: dict[str, Any]) -> Translator:
    result = parse_documents("kube", [NAMESPACE, *docs], strict=False)
    assert result.errors == []
    translator = Translator()
    translator.apply(result.objects)
    return translator


def workload_of(translator: Translator, uid: str) -> wl.Workload:
    address = translator.addresses()[uid]
    assert address.WhichOneof("type") == "workload"
    return address.workload


# (case, pod name, controlling owner (kind, name) or None, pod labels) -> (workload_name, canonical name, revision)
CASES: list[tuple[str, str, tuple[str, str] | None, dict[str, str], tuple[str, str, str]]] = [
    (
        "Deployment: the ReplicaSet's name without its pod-template-hash",
        "reviews-v1-5b8d9c7f4-x2x7k",
        ("ReplicaSet", "reviews-v1-5b8d9c7f4"),
        {"pod-template-hash": "5b8d9c7f4", "version": "v1"},
        ("reviews-v1", "reviews-v1", "v1"),
    ),
    (
        "ReplicaSet used directly (no pod-template-hash): its own name, dashes and all",
        "my-rs-xvnqd",
        ("ReplicaSet", "my-rs"),
        {},
        ("my-rs", "my-rs", "latest"),
    ),
    (
        "ReplicaSet whose name does not end in the pod's hash: its own name",
        "web-abc-q8w2n",
        ("ReplicaSet", "web-abc"),
        {"pod-template-hash": "zzz"},
        ("web-abc", "web-abc", "latest"),
    ),
    (
        "Argo Rollout: the ReplicaSet's name without its rollouts-pod-template-hash",
        "checkout-6dc78b855c-abcde",
        ("ReplicaSet", "checkout-6dc78b855c"),
        {"rollouts-pod-template-hash": "6dc78b855c"},
        ("checkout", "checkout", "latest"),
    ),
    (
        "CronJob run (Job named <cronjob>-<scheduled minute>, 8 digits): the CronJob's name",
        "backup-29400000-k7f2p",
        ("Job", "backup-29400000"),
        {"job-name": "backup-29400000"},
        ("backup", "backup", "latest"),
    ),
    (
        "CronJob run, 10-digit suffix, dashes in the CronJob name",
        "nightly-report-1764300000-abcde",
        ("Job", "nightly-report-1764300000"),
        {},
        ("nightly-report", "nightly-report", "latest"),
    ),
    (
        "Job with a short numeric suffix: the Job's name",
        "migrate-123-abcde",
        ("Job", "migrate-123"),
        {},
        ("migrate-123", "migrate-123", "latest"),
    ),
    (
        "Job with an 11-digit suffix is not a CronJob run",
        "load-12345678901-abcde",
        ("Job", "load-12345678901"),
        {},
        ("load-12345678901", "load-12345678901", "latest"),
    ),
    (
        "StatefulSet: the StatefulSet's name, not the ordinal pod's",
        "db-0",
        ("StatefulSet", "db"),
        {"app": "postgres"},
        ("db", "postgres", "latest"),
    ),
    (
        "DaemonSet: the DaemonSet's name",
        "node-exporter-8fj2k",
        ("DaemonSet", "node-exporter"),
        {},
        ("node-exporter", "node-exporter", "latest"),
    ),
    (
        "OpenShift DeploymentConfig: the deploymentconfig label, not the ReplicationController",
        "frontend-3-abcde",
        ("ReplicationController", "frontend-3"),
        {"deploymentconfig": "frontend"},
        ("frontend", "frontend", "latest"),
    ),
    (
        "plain ReplicationController: its name",
        "legacy-rc-abcde",
        ("ReplicationController", "legacy-rc"),
        {},
        ("legacy-rc", "legacy-rc", "latest"),
    ),
    (
        "any other controller kind (an operator's): its name",
        "kafka-pool-1-abcde",
        ("CloneSet", "kafka-pool-1"),
        {},
        ("kafka-pool-1", "kafka-pool-1", "latest"),
    ),
    ("bare pod: its own name", "debug", None, {}, ("debug", "debug", "latest")),
    (
        "the service.istio.io/workload-name label overrides the owner-derived name",
        "reviews-v1-5b8d9c7f4-x2x7k",
        ("ReplicaSet", "reviews-v1-5b8d9c7f4"),
        {"pod-template-hash": "5b8d9c7f4", "service.istio.io/workload-name": "reviews"},
        ("reviews", "reviews", "latest"),
    ),
    (
        "the workload-name label names a bare pod too",
        "debug",
        None,
        {"service.istio.io/workload-name": "toolbox"},
        ("toolbox", "toolbox", "latest"),
    ),
    (
        "canonical name and revision from the first of their labels present, in Istio's order",
        "api-7f9c-abcde",
        ("ReplicaSet", "api-7f9c"),
        {
            "pod-template-hash": "7f9c",
            "app": "a",
            "app.kubernetes.io/name": "b",
            "service.istio.io/canonical-name": "c",
            "version": "v1",
            "app.kubernetes.io/version": "v2",
        },
        ("api", "c", "v2"),
    ),
    (
        "a canonical label present with an empty value is used as it is (lookupLabelValue tests presence)",
        "api-7f9c-abcde",
        ("ReplicaSet", "api-7f9c"),
        {"pod-template-hash": "7f9c", "app.kubernetes.io/name": "", "app": "web", "version": ""},
        ("api", "", ""),
    ),
]


@pytest.mark.parametrize(("pod_name", "owner", "labels", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pod_workload_name_as_istiod(
    pod_name: str, owner: tuple[str, str] | None, labels: dict[str, str], want: tuple[str, str, str]
) -> None:
    got = workload_of(translated(pod(pod_name, owner, labels)), f"Kubernetes//Pod/demo/{pod_name}")
    assert (got.workload_name, got.canonical_name, got.canonical_revision) == want
    assert got.workload_type == wl.POD


def test_every_cronjob_run_is_one_workload() -> None:
    runs = [pod(f"backup-{29400000 + i * 60}-x{i}", ("Job", f"backup-{29400000 + i * 60}"), {}) for i in range(3)]
    translator = translated(*runs)
    names = {w.workload.workload_name for w in translator.addresses().values() if w.HasField("workload")}
    assert names == {"backup"}


def test_workload_entry_name_from_its_group_then_its_label() -> None:
    """pkg/kube/labels `WorkloadNameFromWorkloadEntry`: an auto-registered entry is named after its WorkloadGroup
    (one name for all its VMs), else the workload-name label, else the entry's own name."""

    def entry(name: str, address: str, annotations: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": "demo", "annotations": annotations, "labels": labels},
            "spec": {"address": address},
        }

    translator = translated(
        entry("product-vm-10.0.0.1", "10.0.0.1", {"istio.io/autoRegistrationGroup": "product-vm"}, {"app": "product"}),
        entry("cache-vm-1", "10.0.0.2", {}, {"service.istio.io/workload-name": "cache"}),
        entry("plain-vm", "10.0.0.3", {}, {}),
    )

    def named(name: str) -> tuple[str, str, int]:
        got = workload_of(translator, f"Kubernetes/networking.istio.io/WorkloadEntry/demo/{name}")
        return got.workload_name, got.canonical_name, got.workload_type

    assert named("product-vm-10.0.0.1") == ("product-vm", "product", wl.POD)
    assert named("cache-vm-1") == ("cache", "cache", wl.POD)
    assert named("plain-vm") == ("plain-vm", "plain-vm", wl.POD)


def test_workload_entry_metadata_labels_win_over_spec_labels() -> None:
    """istiod merges a WorkloadEntry's labels with its metadata's winning (ConvertClientWorkloadEntry), for the
    canonical name as for what selects the entry."""
    entry = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "namespace": "demo", "labels": {"app": "meta", "tier": "db"}},
        "spec": {"address": "10.0.0.9", "labels": {"app": "spec", "version": "v3"}},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "meta", "namespace": "demo"},
        "spec": {"selector": {"app": "meta"}, "clusterIP": "10.96.0.9", "ports": [{"port": 80}]},
    }
    got = workload_of(translated(entry, service), "Kubernetes/networking.istio.io/WorkloadEntry/demo/vm-1")
    assert (got.canonical_name, got.canonical_revision) == ("meta", "v3")
    assert list(got.services) == ["demo/meta.demo.svc.cluster.local"]
