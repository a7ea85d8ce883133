"""ServiceEntry translation against istiod's: resolution NONE is a passthrough service (constructServiceEntries),
so the agent sends a connection to the address the client dialled instead of looking for endpoints it has none of."""

from __future__ import annotations

import pytest

from agent.outbound import RouteKind, route
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.config_files import demo_client

CLIENT = demo_client("node-a")


def entry(spec: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: corp, namespace: demo}}
spec: {spec}
"""


def translate(*texts: str) -> Translator:
    result = parse_yaml_text("t.yaml", "---\n".join(texts))
    assert result.errors == []
    translator = Translator()
    translator.apply(result.objects)
    return translator


@pytest.mark.parametrize(
    "spec",
    [
        "{hosts: [corp.example.com], addresses: [203.0.113.0/24], ports: [{number: 443, name: tls}]}",
        "{hosts: [corp.example.com], addresses: [203.0.113.7], ports: [{number: 443, name: tls}], resolution: NONE}",
    ],
)
def test_resolution_none_passes_connections_through(spec: str) -> None:
    translator = translate(CLIENT, entry(spec))
    service = translator.addresses()["demo/corp.example.com"].service
    lb = wl.LoadBalancing
    assert service.load_balancing == lb(mode=lb.PASSTHROUGH, health_policy=lb.ALLOW_ALL)
    # What a user sees: the agent refused every connection to the entry's addresses (no_healthy_upstream).
    store = WorkloadStore()
    store.put(list(translator.addresses().values()))
    client = translator.addresses()["Kubernetes//Pod/demo/client"].workload
    r = route(store, "node-a", client, ("203.0.113.7", 443))
    assert (r.kind, r.target) == (RouteKind.PASSTHROUGH, ("203.0.113.7", 443))


def test_static_resolution_still_picks_its_endpoints() -> None:
    spec = (
        "{hosts: [corp.example.com], addresses: [203.0.113.7], ports: [{number: 443, name: tls}],"
        " resolution: STATIC, endpoints: [{address: 198.51.100.9}]}"
    )
    translator = translate(CLIENT, entry(spec))
    assert not translator.addresses()["demo/corp.example.com"].service.HasField("load_balancing")


def test_endpoints_with_resolution_none_are_refused() -> None:
    # Passed through, they would be ignored silently; Istio's webhook refuses them.
    spec = "{hosts: [corp.example.com], ports: [{number: 443, name: tls}], endpoints: [{address: 198.51.100.9}]}"
    result = parse_yaml_text("t.yaml", entry(spec))
    assert result.objects == []
    assert [str(e) for e in result.errors] == [
        "t.yaml:ServiceEntry/demo/corp: spec.endpoints: not allowed with resolution NONE"
        " (connections keep their destination address)"
    ]


@pytest.mark.parametrize("protocol", ["MYSQL", "REDIS", "UDP", "GRPC-Web", "HTTP_PROXY", "http", "tls", "Mongo"])
def test_every_protocol_istio_accepts_is_accepted(protocol: str) -> None:
    # Only seven upper-case spellings were: an entry for an external MySQL or Redis (protocol: MYSQL) was refused,
    # so the database it declared was missing from the mesh.
    port = f"{{number: 3306, name: db, protocol: {protocol}}}"
    spec = f"{{hosts: [db.example.com], addresses: [203.0.113.7], ports: [{port}]}}"
    result = parse_yaml_text("t.yaml", entry(spec))
    assert result.errors == []
    assert len(result.objects) == 1


def test_an_unknown_protocol_is_still_refused() -> None:
    spec = "{hosts: [db.example.com], ports: [{number: 3306, name: db, protocol: SMTP}]}"
    result = parse_yaml_text("t.yaml", entry(spec))
    assert result.objects == []
    assert [e.field for e in result.errors] == ["spec.ports[0].protocol"]
    assert "'SMTP'" in result.errors[0].reason
