"""AuthorizationPolicy and PeerAuthentication to istio.security.Authorization (YAML in, protobuf out).

Expected outputs are written as text protos in Istio's shape (groups OR-ed, rules AND-ed, matches OR-ed).
"""

from __future__ import annotations

import socket

import pytest
from google.protobuf import text_format

from agent import rbac
from api.istio.security import authorization_pb2 as pb
from common.spiffe import Identity
from controller import translate_policy
from controller.model import ObjectKey
from controller.translate import Translator
from controller.validation import parse_yaml_text

WORKLOADS = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: demo, labels: {app: db}}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: other, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.7}
"""


def translate(*texts: str) -> Translator:
    objects = []
    for text in texts:
        result = parse_yaml_text("t.yaml", text)
        assert result.errors == []
        objects += result.objects
    translator = Translator()
    translator.apply(objects, [])
    return translator


def policy(name: str, spec: str, ns: str = "demo", api: str = "security.istio.io/v1") -> str:
    return f"apiVersion: {api}\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"


def authz(textproto: str) -> pb.Authorization:
    return text_format.Parse(textproto, pb.Authorization())


def attached(t: Translator, uid: str) -> list[str]:
    return list(t.addresses()[uid].workload.authorization_policies)


def packed(text: str) -> str:
    """Text-proto escaped bytes of an IPv4 address."""
    return "".join(f"\\{b:03o}" for b in socket.inet_aton(text))


POLICY_CASES = [
    pytest.param(
        """
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/demo/sa/client, "*/sa/admin", "spiffe-less*", "*"]}
    - source: {namespaces: [prod], notNamespaces: [test], ipBlocks: [10.0.0.0/8, 192.0.2.1], serviceAccounts: [a, x/b]}
    to:
    - operation: {ports: ["8080", "9090"], notPorts: ["22"]}
""",
        f"""
name: "p" namespace: "demo" scope: WORKLOAD_SELECTOR action: ALLOW
groups {{
  rules {{ matches {{ destination_ports: [8080, 9090] not_destination_ports: [22] }} }}
  rules {{
    matches {{ principals {{ exact: "cluster.local/ns/demo/sa/client" }} principals {{ suffix: "/sa/admin" }}
              principals {{ prefix: "spiffe-less" }} principals {{ presence {{}} }} }}
    matches {{ namespaces {{ exact: "prod" }} not_namespaces {{ exact: "test" }}
              source_ips {{ address: "{packed("10.0.0.0")}" length: 8 }}
              source_ips {{ address: "{packed("192.0.2.1")}" length: 32 }}
              service_accounts {{ namespace: "demo" serviceAccount: "a" }}
              service_accounts {{ namespace: "x" serviceAccount: "b" }} }}
  }}
}}
""",
        "",
        id="allow-selector-l4-fields",
    ),
    pytest.param(
        """
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: [cluster.local/ns/demo/sa/web], notIpBlocks: [10.9.0.0/16]}
    when:
    - {key: destination.port, values: ["443"]}
    - {key: source.ip, notValues: [10.1.0.0/24]}
    - {key: destination.ip, values: [10.1.0.5]}
    - {key: source.namespace, values: [demo]}
    - {key: source.principal, notValues: ["*"]}
""",
        f"""
name: "p" namespace: "demo" scope: NAMESPACE action: DENY
groups {{
  rules {{ matches {{ not_principals {{ exact: "cluster.local/ns/demo/sa/web" }}
                      not_source_ips {{ address: "{packed("10.9.0.0")}" length: 16 }} }} }}
  rules {{ matches {{ destination_ports: 443 }} }}
  rules {{ matches {{ not_source_ips {{ address: "{packed("10.1.0.0")}" length: 24 }} }} }}
  rules {{ matches {{ destination_ips {{ address: "{packed("10.1.0.5")}" length: 32 }} }} }}
  rules {{ matches {{ namespaces {{ exact: "demo" }} }} }}
  rules {{ matches {{ not_principals {{ presence {{}} }} }} }}
}}
""",
        "",
        id="deny-namespace-not-fields-and-l4-when",
    ),
    pytest.param(
        """
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/a]}}]
  - to: [{operation: {methods: [GET], ports: ["80"]}}]
  - from: [{source: {requestPrincipals: ["*"]}}]
  - when:
    - key: request.headers[x-user]
      values: [bob]
""",
        """
name: "p" namespace: "demo" scope: NAMESPACE action: ALLOW
groups { rules { matches { principals { exact: "cluster.local/ns/demo/sa/a" } } } }
""",
        "the L4 agent does not support HTTP attributes (found: methods, request.headers[x-user], requestPrincipals); "
        "use a waypoint to enforce them. Within an ALLOW policy, rules matching HTTP attributes are omitted. "
        "This is more restrictive than requested.",
        id="allow-drops-rules-with-l7-fields",
    ),
    pytest.param(
        """
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {paths: [/admin]}}]
""",
        """name: "p" namespace: "demo" scope: WORKLOAD_SELECTOR action: ALLOW""",
        "the L4 agent does not support HTTP attributes (found: paths); use a waypoint to enforce them. "
        "Within an ALLOW policy, rules matching HTTP attributes are omitted. This is more restrictive than requested.",
        id="allow-with-only-l7-rules-still-exists-and-denies",
    ),
    pytest.param(
        """
  action: DENY
  rules:
  - from: [{source: {namespaces: [evil], remoteIpBlocks: [1.2.3.4]}}]
    to: [{operation: {methods: [POST], ports: ["80"]}}]
""",
        """
name: "p" namespace: "demo" scope: NAMESPACE action: DENY
groups {
  rules { matches { destination_ports: 80 } }
  rules { matches { namespaces { exact: "evil" } } }
}
""",
        "the L4 agent does not support HTTP attributes (found: methods, remoteIpBlocks); use a waypoint to enforce "
        "them. The DENY policy is enforced without its HTTP rules. This is more restrictive than requested.",
        id="deny-mixed-keeps-l4-remainder",
    ),
    pytest.param(
        """
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin]}}]
    when:
    - key: request.auth.claims[group]
      values: [x]
""",
        """
name: "p" namespace: "demo" scope: NAMESPACE action: DENY
groups { rules { matches {} } rules { matches {} } }
""",
        # Agents skip empty matches (as ztunnel), so this policy denies nothing; the warning used to say it was
        # enforced and more restrictive than requested.
        "the L4 agent does not support HTTP attributes (found: paths, request.auth.claims[group]); use a waypoint to "
        "enforce them. Without its HTTP rules the DENY policy has nothing left to match, so it has no effect. "
        "This is less restrictive than requested.",
        id="deny-only-l7-leaves-empty-matches",
    ),
    pytest.param(
        """
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: ["80"]}}]
  - from: [{source: {namespaces: [evil]}}]
    when:
    - key: request.headers[x-user]
      values: [bob]
""",
        """
name: "p" namespace: "demo" scope: NAMESPACE action: DENY
groups { rules { matches { destination_ports: 80 } } }
groups { rules { matches { namespaces { exact: "evil" } } } rules { matches {} } }
""",
        "the L4 agent does not support HTTP attributes (found: methods, request.headers[x-user]); use a waypoint to "
        "enforce them. The DENY policy is enforced without its HTTP rules, which is more restrictive than requested; "
        "its rules that have nothing left to match without them have no effect, which is less restrictive.",
        id="deny-l7-when-voids-its-rule-but-not-the-others",
    ),
    pytest.param(
        "  rules:\n  - {}\n", """name: "p" namespace: "demo" scope: NAMESPACE groups {}""", "", id="allow-all"
    ),
    pytest.param("  {}\n", """name: "p" namespace: "demo" scope: NAMESPACE""", "", id="allow-nothing"),
]


@pytest.mark.parametrize(("spec", "want", "warning"), POLICY_CASES)
def test_authorization_policy_shapes(spec: str, want: str, warning: str) -> None:
    t = translate(WORKLOADS, policy("p", spec))
    assert t.authorizations()["demo/p"] == authz(want)
    assert t.warnings.get(ObjectKey("AuthorizationPolicy", "demo", "p"), "") == warning


def test_deny_rules_voided_by_http_parts_match_nothing_at_the_agent() -> None:
    """What the "no effect" warnings claim, checked against the agent's evaluation (ztunnel's semantics)."""
    spec = POLICY_CASES[[p.id for p in POLICY_CASES].index("deny-l7-when-voids-its-rule-but-not-the-others")]
    policy_pb = translate(WORKLOADS, policy("p", str(spec.values[0]))).authorizations()["demo/p"]
    evil = Identity("cluster.local", "evil", "default")
    assert rbac.matches(policy_pb, rbac.Connection("10.9.0.1", "10.1.0.5", 80, evil))
    assert not rbac.matches(policy_pb, rbac.Connection("10.9.0.1", "10.1.0.5", 81, evil))


def test_v1beta1_and_dry_run() -> None:
    text = """apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p, namespace: demo, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY}
"""
    assert translate(text).authorizations()["demo/p"] == authz(
        'name: "p" namespace: "demo" scope: NAMESPACE action: DENY dry_run: true'
    )


@pytest.mark.parametrize(
    ("spec", "warning"),
    [
        ("  action: AUDIT\n", "action AUDIT is not supported by the L4 agent; the policy is not enforced"),
        (
            "  action: CUSTOM\n  provider: {name: ext-authz}\n",
            "action CUSTOM is not supported by the L4 agent; the policy is not enforced",
        ),
        (
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n",
            translate_policy.NO_WAYPOINT_WARNING,
        ),
    ],
)
def test_policies_not_sent_to_agents(spec: str, warning: str) -> None:
    t = translate(WORKLOADS, policy("p", spec))
    assert "demo/p" not in t.authorizations()
    assert t.warnings.get(ObjectKey("AuthorizationPolicy", "demo", "p"), "") == warning


def test_scopes_and_attachment() -> None:
    t = translate(
        WORKLOADS,
        policy("ns-wide", "  action: DENY\n"),
        policy("global", "  action: DENY\n", ns="istio-system"),
        policy("web-only", "  selector: {matchLabels: {app: web}}\n"),
        policy("every-web", "  selector: {matchLabels: {app: web}}\n", ns="istio-system"),
        policy("all-in-demo", "  selector: {matchLabels: {}}\n"),
    )
    scopes = {name: a.scope for name, a in t.authorizations().items()}
    assert scopes == {
        "demo/ns-wide": pb.NAMESPACE,
        "istio-system/global": pb.GLOBAL,
        "demo/web-only": pb.WORKLOAD_SELECTOR,
        "istio-system/every-web": pb.WORKLOAD_SELECTOR,
        "demo/all-in-demo": pb.WORKLOAD_SELECTOR,
    }
    # Only selector policies are listed on workloads; root-namespace selector policies reach every namespace.
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["demo/all-in-demo", "demo/web-only", "istio-system/every-web"]
    assert attached(t, "Kubernetes//Pod/demo/db-0") == ["demo/all-in-demo"]
    assert attached(t, "Kubernetes//Pod/other/web-0") == ["istio-system/every-web"]


def peer_auth(name: str, ns: str, spec: str, created: str = "2024-01-01T00:00:00Z") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}\nspec:\n{spec}"
    )


STATIC = """
name: "istio_converted_static_strict" namespace: "istio-system" scope: WORKLOAD_SELECTOR action: DENY
groups { rules { matches { not_principals { presence {} } } } }
"""


def test_mesh_strict_attaches_static_policy_everywhere() -> None:
    t = translate(WORKLOADS, peer_auth("default", "istio-system", "  mtls: {mode: STRICT}\n"))
    assert t.authorizations() == {"istio-system/istio_converted_static_strict": authz(STATIC)}
    for uid in ("Kubernetes//Pod/demo/web-0", "Kubernetes//Pod/demo/db-0", "Kubernetes//Pod/other/web-0"):
        assert attached(t, uid) == ["istio-system/istio_converted_static_strict"]


def test_namespace_permissive_overrides_mesh_strict() -> None:
    t = translate(
        WORKLOADS,
        peer_auth("default", "istio-system", "  mtls: {mode: STRICT}\n"),
        peer_auth("relaxed", "demo", "  mtls: {mode: PERMISSIVE}\n"),
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == []
    assert attached(t, "Kubernetes//Pod/other/web-0") == ["istio-system/istio_converted_static_strict"]


def test_permissive_only_still_sends_static_policy_but_attaches_nothing() -> None:
    t = translate(WORKLOADS, peer_auth("default", "demo", "  mtls: {mode: PERMISSIVE}\n"))
    assert list(t.authorizations()) == ["istio-system/istio_converted_static_strict"]
    assert attached(t, "Kubernetes//Pod/demo/web-0") == []


def test_strict_workload_with_permissive_port() -> None:
    spec = (
        "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {9090: {mode: PERMISSIVE}}\n"
    )
    t = translate(WORKLOADS, peer_auth("web-strict", "demo", spec))
    assert t.authorizations()["demo/converted_peer_authentication_web-strict"] == authz(
        """
name: "converted_peer_authentication_web-strict" namespace: "demo" scope: WORKLOAD_SELECTOR action: DENY
groups {
  rules { matches { not_principals { presence {} } } }
  rules { matches { not_destination_ports: 9090 } }
}
"""
    )
    # The converted policy carries the STRICT part, so the static one is not attached to this workload.
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["demo/converted_peer_authentication_web-strict"]
    assert attached(t, "Kubernetes//Pod/demo/db-0") == []


def test_permissive_workload_with_strict_ports() -> None:
    spec = (
        "  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}\n"
        "  portLevelMtls: {8443: {mode: STRICT}, 8080: {mode: STRICT}}\n"
    )
    t = translate(WORKLOADS, peer_auth("web-ports", "demo", spec))
    assert t.authorizations()["demo/converted_peer_authentication_web-ports"] == authz(
        """
name: "converted_peer_authentication_web-ports" namespace: "demo" scope: WORKLOAD_SELECTOR action: DENY
groups { rules { matches { not_principals { presence {} } destination_ports: 8080 } } }
groups { rules { matches { not_principals { presence {} } destination_ports: 8443 } } }
"""
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["demo/converted_peer_authentication_web-ports"]


def test_unset_workload_under_strict_namespace_with_permissive_port_merges_strict() -> None:
    t = translate(
        WORKLOADS,
        peer_auth("ns-strict", "demo", "  mtls: {mode: STRICT}\n"),
        peer_auth(
            "web", "demo", "  selector: {matchLabels: {app: web}}\n  portLevelMtls: {9090: {mode: PERMISSIVE}}\n"
        ),
    )
    assert t.authorizations()["demo/converted_peer_authentication_web"] == authz(
        """
name: "converted_peer_authentication_web" namespace: "demo" scope: WORKLOAD_SELECTOR action: DENY
groups {
  rules { matches { not_destination_ports: 9090 } }
  rules { matches { not_principals { presence {} } } }
}
"""
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["demo/converted_peer_authentication_web"]
    assert attached(t, "Kubernetes//Pod/demo/db-0") == ["istio-system/istio_converted_static_strict"]


WEB_SELECTOR = "  selector: {matchLabels: {app: web}}\n"


def _plaintext_denied(t: Translator, uid: str, port: int) -> bool:
    """Would the agent deny a connection without a peer identity to `port` of this workload?"""
    policies = [t.authorizations()[k] for k in attached(t, uid) if k in t.authorizations()]
    conn = rbac.Connection("10.9.0.1", "10.1.0.5", port, None)
    return any(rbac.matches(p, conn) for p in policies if p.action == pb.DENY)


def test_permissive_port_exception_under_strict_mesh_and_unset_namespace_policy() -> None:
    """A namespace policy with no mode inherits the mesh's STRICT. The converted workload policy used to be
    dropped (istiod's inline test read the UNSET namespace policy as not STRICT) while the workload still
    referenced it: plaintext was accepted on every port, not only on 9090."""
    t = translate(
        WORKLOADS,
        peer_auth("default", "istio-system", "  mtls: {mode: STRICT}\n"),
        peer_auth("ns", "demo", "  mtls: {mode: UNSET}\n"),
        peer_auth(
            "web", "demo", "  selector: {matchLabels: {app: web}}\n  portLevelMtls: {9090: {mode: PERMISSIVE}}\n"
        ),
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["demo/converted_peer_authentication_web"]
    assert "demo/converted_peer_authentication_web" in t.authorizations()
    assert _plaintext_denied(t, "Kubernetes//Pod/demo/web-0", 8080)
    assert not _plaintext_denied(t, "Kubernetes//Pod/demo/web-0", 9090)


def test_strict_port_of_permissive_workload_under_strict_mesh() -> None:
    """The port asked to be STRICT was skipped as "enforced by the parent" (istiod's `a || b && c || d && e`
    reads a STRICT mesh as the parent of a PERMISSIVE workload), so no policy was made and 8443 took plaintext."""
    t = translate(
        WORKLOADS,
        peer_auth("default", "istio-system", "  mtls: {mode: STRICT}\n"),
        peer_auth(
            "web",
            "demo",
            WEB_SELECTOR + "  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {8443: {mode: STRICT}}\n",
        ),
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["demo/converted_peer_authentication_web"]
    assert _plaintext_denied(t, "Kubernetes//Pod/demo/web-0", 8443)
    assert not _plaintext_denied(t, "Kubernetes//Pod/demo/web-0", 8080)


def test_port_disable_with_no_workload_mode_stays_strict_and_the_warning_says_so() -> None:
    """As istiod converts it: a port-level DISABLE (or PERMISSIVE) exception needs a workload mode to be an exception
    to; with none, the inherited STRICT holds on that port too (fails closed). The warning must not promise
    plaintext there."""
    t = translate(
        WORKLOADS,
        peer_auth("default", "istio-system", "  mtls: {mode: STRICT}\n"),
        peer_auth("web", "demo", WEB_SELECTOR + "  portLevelMtls: {9090: {mode: DISABLE}}\n"),
    )
    assert _plaintext_denied(t, "Kubernetes//Pod/demo/web-0", 9090)
    warning = t.warnings[ObjectKey("PeerAuthentication", "demo", "web")]
    assert warning.endswith("a port-level DISABLE with no workload mode stays STRICT under a STRICT namespace or mesh")


def test_oldest_namespace_policy_wins() -> None:
    t = translate(
        WORKLOADS,
        peer_auth("newer", "demo", "  mtls: {mode: PERMISSIVE}\n", created="2024-06-01T00:00:00Z"),
        peer_auth("older", "demo", "  mtls: {mode: STRICT}\n", created="2023-01-01T00:00:00Z"),
    )
    assert attached(t, "Kubernetes//Pod/demo/db-0") == ["istio-system/istio_converted_static_strict"]


def test_strict_with_all_strict_ports_needs_no_converted_policy_and_disable_warns() -> None:
    t = translate(
        WORKLOADS,
        peer_auth(
            "a",
            "demo",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {80: {mode: STRICT}}\n",
        ),
        peer_auth("b", "other", "  mtls: {mode: DISABLE}\n"),
    )
    assert list(t.authorizations()) == ["istio-system/istio_converted_static_strict"]
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["istio-system/istio_converted_static_strict"]
    assert attached(t, "Kubernetes//Pod/other/web-0") == []
    assert t.warnings == {
        ObjectKey(
            "PeerAuthentication", "other", "b"
        ): "mode DISABLE is not supported in ambient mode and is treated as PERMISSIVE"
    }


def test_port_numbers_take_ascii_digits_only() -> None:
    """Like istiod's strconv.ParseUint: '²' used to raise ValueError and '٣' became port 3."""
    assert translate_policy.port_numbers(["²", "٣", "80", 443, "70000"]) == [80, 443]
