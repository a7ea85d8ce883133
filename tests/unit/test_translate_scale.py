"""Scale check: 10,000 workloads, 1,000 services and 1,000 policies translate correctly.

Timings are printed, not asserted (performance is measured in bench/).
"""

from __future__ import annotations

import time

from controller.model import ObjectKey
from controller.synthetic import Scale, documents
from controller.translate import Translator
from controller.validation import parse_documents


def test_full_build_and_single_changes_at_scale() -> None:
    scale = Scale()
    started = time.perf_counter()
    parsed = parse_documents("synthetic", documents(scale))
    parsed_at = time.perf_counter()
    translator = Translator()
    delta = translator.apply(parsed.objects, [])
    built_at = time.perf_counter()

    assert parsed.errors == []
    addresses, policies = translator.addresses(), translator.authorizations()
    workloads = [a.workload for a in addresses.values() if a.WhichOneof("type") == "workload"]
    services = [a.service for a in addresses.values() if a.WhichOneof("type") == "service"]
    assert (len(workloads), len(services)) == (scale.workloads, scale.services)
    assert len(policies) == scale.policies + 1  # plus the static STRICT policy of the mesh PeerAuthentication
    assert delta.addresses == addresses and delta.authorizations == policies
    # Every pod backs exactly its service, with the named target port resolved; selector policies attach 9 in 10.
    assert all(len(w.services) == 1 and w.tunnel_protocol == 1 for w in workloads)
    first = addresses["Kubernetes//Pod/ns-0/pod-0"].workload
    ports = first.services["ns-0/svc-0.ns-0.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 8080), (9090, 9090)]
    # As istiod: sorted selector policies first, then the PeerAuthentication-derived ones.
    assert list(first.authorization_policies) == ["ns-0/policy-0", "istio-system/istio_converted_static_strict"]
    assert sum(1 for w in workloads if len(w.authorization_policies) == 2) == 9_000

    single_started = time.perf_counter()
    change = translator.apply([], [ObjectKey("Pod", "ns-7", "pod-7")])
    single_done = time.perf_counter()
    assert change.addresses == {"Kubernetes//Pod/ns-7/pod-7": None} and change.authorizations == {}
    policy_change = translator.apply([], [ObjectKey("AuthorizationPolicy", "ns-3", "policy-3")])
    policy_done = time.perf_counter()
    assert policy_change.authorizations == {"ns-3/policy-3": None}
    # policy-3 selected app=svc-3: pods 3, 1003, ..., 9003 lose it, nothing else changes.
    assert sorted(policy_change.addresses) == sorted(f"Kubernetes//Pod/ns-3/pod-{i}" for i in range(3, 10_000, 1_000))
    print(
        f"\nscale: parse {parsed_at - started:.2f}s, full build {built_at - parsed_at:.2f}s, "
        f"pod delete {1000 * (single_done - single_started):.2f}ms, "
        f"policy delete {1000 * (policy_done - single_done):.2f}ms"
    )
