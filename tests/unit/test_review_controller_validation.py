"""Bad input found in review: each case is a document the controller once mishandled, with the error it now gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.model import AuthorizationPolicy
from controller.monitoring import ControllerMetrics
from controller.sources.files import FileSource
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_yaml_text

GATEWAY_API = "apiVersion: gateway.networking.k8s.io/v1\n"
GOOD_POD = """apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.5}
"""


@pytest.mark.parametrize(
    ("document", "error"),
    [
        (
            GATEWAY_API + "kind: Gateway\nmetadata: {name: wp, namespace: demo}\nspec: [1]\n",
            "f.yaml:Gateway/demo/wp: spec: must be a mapping, got a list",
        ),
        (
            GATEWAY_API + "kind: HTTPRoute\nmetadata: {name: r, namespace: demo}\nspec: ab\n",
            "f.yaml:HTTPRoute/demo/r: spec: must be a mapping, got a string",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j, namespace: demo}\n"
            "spec: [[a, b]]\n",
            "f.yaml:RequestAuthentication/demo/j: spec: must be a mapping, got a list",
        ),
    ],
)
def test_opaque_kind_with_a_spec_that_is_not_a_mapping_is_an_error_not_a_crash(document: str, error: str) -> None:
    # dict() of a list or string raised TypeError/ValueError out of validation.
    result = parse_yaml_text("f.yaml", GOOD_POD + "---\n" + document)
    assert [str(e) for e in result.errors] == [error]
    assert [str(o.key) for o in result.objects] == ["Pod/demo/web-0"]


async def test_a_file_with_such_a_document_does_not_stop_other_files_from_loading(tmp_path: Path) -> None:
    # The exception aborted the whole directory scan: no file, good or bad, was applied while it was there.
    (tmp_path / "a-gateway.yaml").write_text(
        GATEWAY_API + "kind: Gateway\nmetadata: {name: wp, namespace: demo}\nspec: [1]\n"
    )
    (tmp_path / "b-pod.yaml").write_text(GOOD_POD)
    store = ConfigStore(Translator(), ControllerMetrics())
    assert await FileSource(str(tmp_path), store).sync() == 2
    names = [a.workload.name for a in store.translator.addresses().values() if a.HasField("workload")]
    assert names == ["web-0"]
    assert store.errors() == [f"{tmp_path / 'a-gateway.yaml'}:Gateway/demo/wp: spec: must be a mapping, got a list"]


def _policy(annotation: str, action: str = "DENY") -> str:
    return f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: demo, annotations: {{istio.io/dry-run: {annotation}}}}}
spec: {{action: {action}, rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]}}
"""


@pytest.mark.parametrize(
    ("annotation", "dry_run"),
    [("'true'", True), ("'True'", True), ("'1'", True), ("t", True), ("'false'", False), ("'0'", False), ("F", False)],
)
def test_dry_run_annotation_reads_as_istiod_reads_it(annotation: str, dry_run: bool) -> None:
    # Go's strconv.ParseBool: "1" and "t" asked for a dry run and the policy was enforced instead.
    result = parse_yaml_text("f.yaml", _policy(annotation))
    assert result.errors == []
    (policy,) = result.objects
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.dry_run is dry_run


@pytest.mark.parametrize("annotation", ["'yes'", "tRuE", "'on'", "''"])
def test_dry_run_annotation_that_is_not_a_boolean_is_refused(annotation: str) -> None:
    # It was enforced silently (istiod's webhook refuses it): the user asked for a dry run and got a DENY.
    result = parse_yaml_text("f.yaml", _policy(annotation))
    assert result.objects == []
    assert [e.field for e in result.errors] == ["metadata.annotations[istio.io/dry-run]"]
    where = "f.yaml:AuthorizationPolicy/demo/p: metadata.annotations[istio.io/dry-run]: "
    assert str(result.errors[0]).startswith(where)


SE = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: demo}\n"


@pytest.mark.parametrize(
    ("spec", "errors"),
    [
        ("{hosts: [], ports: [{number: 443, name: tls}]}", ["spec.hosts: must not be empty"]),
        ("{hosts: 5}", ["spec.hosts: must be a list, got an integer"]),
        ("{hosts: ['*'], ports: [{number: 443, name: tls}]}", ["spec.hosts[0]: '*' alone is not a valid host"]),
        (
            "{hosts: [a.example.com], ports: [{number: 443, name: tls}, {number: 8443, name: tls}]}",
            ["spec.ports: port names must be unique"],
        ),
        (
            "{hosts: [a.example.com], ports: [{number: 443, name: tls}], resolution: STATIC,"
            " endpoints: [{address: 192.0.2.1, ports: {tsl: 9443}}]}",
            ["spec.endpoints[0].ports[tsl]: names no port of spec.ports"],
        ),
    ],
)
def test_service_entry_fields_istio_refuses(spec: str, errors: list[str]) -> None:
    # Each was accepted: no hosts (a ServiceEntry that serves nothing), '*' (a service named '*'), a port name
    # used twice (endpoints map target ports by name), an endpoint port name that matches nothing (its target
    # port silently ignored).
    result = parse_yaml_text("f.yaml", SE + f"spec: {spec}\n")
    assert result.objects == []
    got = [str(e).removeprefix("f.yaml:ServiceEntry/demo/ext: ") for e in result.errors]
    assert len(got) == len(errors)
    for text, want in zip(got, errors, strict=True):
        assert text.startswith(want)


@pytest.mark.parametrize("condition", ["{key: source.ip, values: []}", "{key: source.ip, values: [], notValues: []}"])
def test_condition_with_only_empty_lists_is_refused(condition: str) -> None:
    # It matched nothing, so the ALLOW policy holding it denied every connection to the workload.
    policy = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: demo}}
spec: {{rules: [{{from: [{{source: {{namespaces: [demo]}}}}], when: [{condition}]}}]}}
"""
    result = parse_yaml_text("f.yaml", policy)
    assert result.objects == []
    assert [str(e) for e in result.errors] == [
        "f.yaml:AuthorizationPolicy/demo/p: spec.rules[0].when[0]: values or notValues must be set"
    ]
