"""`rbac.explain` (`/explain`, `ambitctl explain`) answers what the data path does: a caller outside the mesh reaches
an enrolled pod in plaintext, with no identity to present (so STRICT refuses it), and a destination outside the mesh
is reached by plain passthrough, where no agent enforces policy."""

from __future__ import annotations

from agent import rbac
from agent.state import WorkloadStore
from api.istio.security import authorization_pb2 as apb
from common.spiffe import Identity
from tests.support.workloads import pod_workload

STRICT = apb.Authorization(
    name="istio_converted_static_strict",
    namespace="istio-system",
    scope=apb.WORKLOAD_SELECTOR,
    action=apb.DENY,
    groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(not_principals=[apb.StringMatch(presence={})])])])],
)
KEY = "istio-system/istio_converted_static_strict"


def store() -> WorkloadStore:
    s = WorkloadStore()
    s.put(
        [
            pod_workload("app", "client", "10.1.0.5", sa="app", node="n1"),
            pod_workload("legacy", "legacy", "10.1.0.9", sa="old", node="n1", hbone=False),
            pod_workload("db", "server", "10.2.0.7", sa="db", node="n2", authorization_policies=[KEY]),
            pod_workload("outside", "legacy", "10.2.0.9", node="n2", hbone=False, authorization_policies=[KEY]),
        ],
        [STRICT],
    )
    return s


def test_a_caller_outside_the_mesh_has_no_identity_to_present() -> None:
    got = rbac.explain(store(), "cluster.local", "10.1.0.9", ("10.2.0.7", 5432))
    assert (got["decision"], got["policy"]) == ("deny", KEY)  # was allowed, as if the legacy pod spoke mTLS
    assert "no-identity" in got["connection"]
    # an enrolled caller presents its own identity; an explicit one is taken as given
    assert rbac.explain(store(), "cluster.local", "10.1.0.5", ("10.2.0.7", 5432))["decision"] == "allow"
    given = Identity.parse("spiffe://cluster.local/ns/legacy/sa/old")
    assert rbac.explain(store(), "cluster.local", "10.1.0.9", ("10.2.0.7", 5432), given)["decision"] == "allow"


def test_a_destination_outside_the_mesh_is_not_policed() -> None:
    got = rbac.explain(store(), "cluster.local", "10.1.0.5", ("10.2.0.9", 80), plaintext=True)
    assert got["decision"] == "allow" and got["policy"] is None
    assert got["applicable_policies"] == [] and "not in the mesh" in got["reason"]
