"""A config file with an invalid document: only the object that document was keeps its last good version; the
file's other edits apply, deletions of other documents included (as with the API server, where every object
stands on its own). Before, any error in a file held back every deletion in it until the file was clean.

First which objects a rejected document stands for (controller.sources.rejected, no I/O), then the file source
and the store: a running controller, and one restarted with a state directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.monitoring import ControllerMetrics
from controller.sources.files import FileSource
from controller.sources.rejected import held_objects
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.config_files import NS, bump_mtime, pod_yaml, served, write

DENY_KEY = "AuthorizationPolicy/demo/deny-evil"
DENY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: demo}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
"""

# Ways to break the DENY document; for each, the start of the error it gives (file, resource, field).
BROKEN = {
    "field": (DENY.replace("action: DENY", "action: DENYY"), "AuthorizationPolicy/demo/deny-evil: spec.action: "),
    "kind-typo": (
        DENY.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolicyy"),
        "AuthorizationPolicyy/demo/deny-evil: kind: unknown kind",
    ),
    "yaml-syntax": (DENY.replace("spec: {action", "spec: [{action"), "?//#"),
    "name-not-a-name": (DENY.replace("name: deny-evil", "name: Deny_Evil"), "AuthorizationPolicy/demo/Deny_Evil: "),
    "no-kind": (DENY.replace("kind: AuthorizationPolicy\n", ""), "?/demo/deny-evil: kind: required field"),
    "new-name-and-field": (
        DENY.replace("name: deny-evil", "name: deny-evl").replace("action: DENY", "action: DENYY"),
        "AuthorizationPolicy/demo/deny-evl: spec.action: ",
    ),
}


def docs(*texts: str) -> str:
    return "---\n".join(texts)


def held(old: str, new: str) -> set[str]:
    before = parse_yaml_text("f.yaml", old)
    assert not before.errors
    return {str(key) for key in held_objects(before.texts, parse_yaml_text("f.yaml", new))}


P1, P2, P3 = pod_yaml("p1", "10.0.0.1"), pod_yaml("p2", "10.0.0.2"), pod_yaml("p3", "10.0.0.3")
OLD = docs(P1, P2, DENY, P3)


# ---- which object a rejected document stands for -------------------------------------------------------------------


@pytest.mark.parametrize("way", BROKEN)
@pytest.mark.parametrize(
    "new",
    [
        pytest.param(lambda bad: docs(P1, bad), id="others-deleted"),
        pytest.param(lambda bad: docs(P1, P2, bad), id="neighbour-after-deleted"),
        pytest.param(lambda bad: docs(P1, bad, P3), id="neighbour-before-deleted"),
        pytest.param(lambda bad: docs(bad, P3.replace("10.0.0.3", "10.0.0.4")), id="moved-and-others-edited"),
    ],
)
def test_a_broken_document_holds_only_its_own_object(way: str, new: Callable[[str], str]) -> None:
    bad, _ = BROKEN[way]
    assert held(OLD, new(bad)) == {DENY_KEY}


def test_nothing_is_held_when_the_broken_object_is_new() -> None:
    assert held(docs(P1, P2), docs(P1, P2, BROKEN["field"][0])) == set()
    # A new policy cannot be what the deleted pod became: a renamed object keeps its kind.
    assert held(docs(P1, P2), docs(P1, BROKEN["field"][0])) == set()
    assert held(docs(P1, P2), docs(P1, BROKEN["name-not-a-name"][0])) == set()


def test_two_broken_look_alikes_each_hold_their_own() -> None:
    """p1 and p2 differ in three lines of five: each broken one resembles itself most, and p3 (deleted) goes."""
    typo = "kind: Podd"
    new = docs(P1.replace("kind: Pod", typo), P2.replace("kind: Pod", typo), DENY)
    assert held(OLD, new) == {"Pod/demo/p1", "Pod/demo/p2"}


def test_a_broken_document_as_close_to_several_holds_them_all() -> None:
    """Only the lines every pod has are left: which pod it was cannot be told, so none of them goes."""
    assert held(OLD, docs("apiVersion: v1\nkind: Pod\nmetadata: [\n", DENY)) == {
        "Pod/demo/p1",
        "Pod/demo/p2",
        "Pod/demo/p3",
    }


def test_a_broken_document_whose_look_alike_was_claimed_does_not_stop_the_others() -> None:
    """Two broken pods, one previous pod left for them (the other deleted... or what one of them became), and a
    broken policy: the policy's document still finds the policy."""
    broken_pod = P1.replace("kind: Pod", "kind: Podd")
    policy = DENY.replace("name: deny-evil", "name: Deny_Evil").replace("action: DENY", "action: DENYY")
    policy = policy.replace("security.istio.io/v1", "security.istio.io/v1beta1")  # little like its old self
    new = docs(broken_pod, broken_pod.replace("p1", "p9"), policy)
    assert held(docs(P1, DENY), new) == {"Pod/demo/p1", DENY_KEY}


def test_a_broken_list_document_holds_its_items() -> None:
    pods = [pod_yaml("p1", "10.0.0.1"), pod_yaml("p2", "10.0.0.2")]
    items = "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "- " + p.replace("\n", "\n  ").rstrip() + "\n" for p in pods
    )
    assert held(docs(items, DENY), docs(items.replace("items:", "items: ["))) == {"Pod/demo/p1", "Pod/demo/p2"}


def test_a_new_broken_document_holds_back_a_deletion_in_the_same_edit() -> None:
    """It names nothing the file served, so it may be what a deleted document became: kept, erring on the side of
    config (the deletion applies once the file is fixed). Unless they have not a line in common."""
    assert held(docs(P1, P2), docs(P1, "apiVersion: v1\nkind: [unclosed\n")) == {"Pod/demo/p2"}
    assert held(docs(P1, P2), docs(P1, "kind: [unclosed\n")) == set()


def test_a_duplicate_document_holds_nothing() -> None:
    assert held(docs(P1, P2), docs(P1, P1.replace("10.0.0.1", "10.0.0.9"))) == set()


# ---- the file source -----------------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    root.mkdir()
    (root / "ns.yaml").write_text(NS)
    (root / "demo.yaml").write_text(OLD)
    return root


async def start(config: Path, state: str | None) -> tuple[FileSource, ConfigStore]:
    store = ConfigStore(Translator(), ControllerMetrics())
    source = FileSource(str(config), store, state_dir=state)
    await source.sync()
    return source, store


def pod_ip(store: ConfigStore, name: str) -> bytes:
    addresses = store.translator.addresses().values()
    return next(a.workload.addresses[0] for a in addresses if a.HasField("workload") and a.workload.name == name)


@pytest.mark.parametrize("way", BROKEN)
async def test_deleting_and_editing_beside_a_broken_document_apply(config: Path, way: str) -> None:
    source, store = await start(config, None)
    bad, error = BROKEN[way]
    demo = config / "demo.yaml"
    # p1 edited, p2 and p3 deleted, the DENY broken (not last: see test_controller_c_cut_short)
    write(demo, docs(bad, P1.replace("10.0.0.1", "10.0.0.9")))
    await source.sync()
    assert served(store) == {"Namespace//demo", "Pod/demo/p1", DENY_KEY}
    assert pod_ip(store, "p1") == bytes([10, 0, 0, 9])
    assert len(store.translator.authorizations()) == 1
    (message,) = store.errors()
    assert message.startswith(f"{demo}:{error}"), message
    status = store.status()["objects"]
    assert status[DENY_KEY]["status"] == ("rejected" if way == "field" else "stale")
    assert "Pod/demo/p2" not in status and "Pod/demo/p3" not in status
    # Still broken, p1 deleted too and p3 back: the DENY is still held (against its last good version), p1 goes.
    write(demo, docs(bad, P3))
    await source.sync()
    assert served(store) == {"Namespace//demo", "Pod/demo/p3", DENY_KEY}
    write(demo, DENY.replace("action: DENY", "action: ALLOW"))  # fixed
    await source.sync()
    assert served(store) == {"Namespace//demo", DENY_KEY} and store.errors() == []
    assert [p.action for p in store.translator.authorizations().values()] == [0]  # ALLOW


async def test_an_unreadable_file_still_keeps_everything(config: Path) -> None:
    source, store = await start(config, None)
    (config / "demo.yaml").write_bytes(b"\xff\xfe not text")
    bump_mtime(config / "demo.yaml")
    await source.sync()
    assert {"Pod/demo/p1", "Pod/demo/p2", "Pod/demo/p3", DENY_KEY} <= served(store)


@pytest.mark.parametrize("way", ["field", "kind-typo", "yaml-syntax"])
async def test_a_restart_restores_only_the_broken_documents_object(
    config: Path, tmp_path: Path, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Broken and a document deleted while the controller was down: the restart serves the DENY from the state
    directory and not the deleted pod, which never comes back."""
    state = str(tmp_path / "state")
    await start(config, state)
    write(config / "demo.yaml", docs(P1, BROKEN[way][0], P3))  # p2 deleted
    with caplog.at_level(logging.WARNING):
        source, store = await start(config, state)
    assert served(store) == {"Namespace//demo", "Pod/demo/p1", "Pod/demo/p3", DENY_KEY}
    (restored,) = [r for r in caplog.records if "last good objects from the state directory" in r.getMessage()]
    assert restored.__dict__["fields"]["objects"] == 1
    _, again = await start(config, state)  # and what it saved since holds the same
    assert served(again) == served(store)
    write(config / "demo.yaml", docs(BROKEN[way][0], P1))  # p3 deleted while running: goes
    await source.sync()
    assert served(store) == {"Namespace//demo", "Pod/demo/p1", DENY_KEY}
