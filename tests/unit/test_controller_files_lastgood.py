"""The file source keeps the last good version of an object while its file holds a bad document, across restarts
of the controller too (the state directory), and forgets only what was removed on purpose."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from common import flags
from controller.main import ControllerConfig
from controller.monitoring import ControllerMetrics
from controller.sources.files import FileSource
from controller.sources.last_good import SUFFIX, LastGood, default_state_dir
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.config_files import NS, bump_mtime, pod_yaml, served, write

DENY_KEY = "AuthorizationPolicy/demo/deny-evil"


def deny(kind: str = "AuthorizationPolicy", name: str = "deny-evil", action: str = "DENY") -> str:
    return f"""apiVersion: security.istio.io/v1
kind: {kind}
metadata: {{name: {name}, namespace: demo}}
spec: {{action: {action}, rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]}}
"""


def actions(store: ConfigStore) -> dict[str, int]:
    return {name: policy.action for name, policy in store.translator.authorizations().items()}


def new_store() -> ConfigStore:
    return ConfigStore(Translator(), ControllerMetrics())


@pytest.fixture
def config(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    root.mkdir()
    (root / "ns.yaml").write_text(NS)
    (root / "policy.yaml").write_text(pod_yaml("p1", "10.0.0.1") + "---\n" + deny())
    return root


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state")


async def start(config: Path, state: str | None) -> tuple[FileSource, ConfigStore]:
    """A controller's start: a fresh store, one sync before anything is served."""
    store = new_store()
    source = FileSource(str(config), store, state_dir=state)
    await source.sync()
    return source, store


# ---- a running controller ------------------------------------------------------------------------------------------


async def test_a_kind_typo_keeps_the_object_and_names_file_document_and_field(config: Path) -> None:
    source, store = await start(config, None)
    assert DENY_KEY in served(store)
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1") + "---\n" + deny(kind="AuthorizationPolicyy"))
    await source.sync()
    assert DENY_KEY in served(store), "a typo in kind removed the DENY policy"
    assert store.errors() == [
        f"{config / 'policy.yaml'}:AuthorizationPolicyy/demo/deny-evil: kind: unknown kind 'AuthorizationPolicyy' in "
        "document #2 (did you mean AuthorizationPolicy?)"
    ]
    status = store.status()
    assert status["objects"][DENY_KEY]["status"] == "stale"  # kept: its file has an error it cannot be tied to
    assert "AuthorizationPolicyy/demo/deny-evil" not in status["objects"]  # no such object is claimed to exist
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1"))  # fixed by removing the document: now it goes
    await source.sync()
    assert DENY_KEY not in served(store) and store.errors() == []


async def test_a_name_typo_that_is_not_a_name_keeps_the_object(config: Path) -> None:
    source, store = await start(config, None)
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1") + "---\n" + deny(name="Deny_evil"))
    await source.sync()
    assert DENY_KEY in served(store)
    (error,) = store.errors()
    assert error.startswith(f"{config / 'policy.yaml'}:AuthorizationPolicy/demo/Deny_evil: metadata.name: ")


async def test_a_name_typo_that_is_a_valid_name_renames_the_object(config: Path) -> None:
    source, store = await start(config, None)
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1") + "---\n" + deny(name="deny-evl"))
    await source.sync()
    assert "AuthorizationPolicy/demo/deny-evl" in served(store) and DENY_KEY not in served(store)
    assert store.errors() == []


async def test_a_document_deleted_in_the_edit_that_broke_another_goes(config: Path) -> None:
    """Only the broken document's object keeps its last good version: a document deleted in the same edit goes, as
    a deleted object does with the API server (more cases in test_controller_c_rejected)."""
    source, store = await start(config, None)
    # p1 deleted, the policy broken (and not last: a file whose last document is invalid may be cut short)
    write(config / "policy.yaml", deny(action="DENYY") + "---\n" + pod_yaml("p2", "10.0.0.2"))
    await source.sync()
    assert {DENY_KEY, "Pod/demo/p2"} <= served(store) and "Pod/demo/p1" not in served(store)
    assert store.status()["objects"][DENY_KEY]["status"] == "rejected"
    assert "Pod/demo/p1" not in store.status()["objects"]
    write(config / "policy.yaml", deny())
    await source.sync()
    assert DENY_KEY in served(store) and store.errors() == []


# ---- a restarted controller ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param((pod_yaml("p1", "10.0.0.1") + "---\n" + deny(action="DENYY")).encode(), id="invalid-field"),
        pytest.param((pod_yaml("p1", "10.0.0.1") + "---\n" + deny(kind="AuthorizationPolicyy")).encode(), id="kind"),
        pytest.param((pod_yaml("p1", "10.0.0.1") + "---\nkind: [unclosed\n").encode(), id="yaml-syntax"),
        pytest.param(b"\xff\xfe not text", id="not-utf8"),
    ],
)
async def test_a_restart_serves_the_last_good_version_of_an_object_whose_file_went_bad(
    config: Path, state: str, bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The DENY is edited into an invalid shape while the controller is down (or before it restarts): the restarted
    controller must keep it, and say why."""
    _, before = await start(config, state)
    policy = config / "policy.yaml"
    policy.write_bytes(bad)
    bump_mtime(policy)
    with caplog.at_level(logging.WARNING):
        _, store = await start(config, state)  # the restart
    assert actions(store) == actions(before) and len(actions(store)) == 1, "the DENY was lost in the restart"
    assert {"Pod/demo/p1", DENY_KEY} <= served(store)
    errors = store.errors()
    assert errors and all(e.startswith(str(policy)) for e in errors), errors
    assert store.metrics.config_errors._value.get() == len(errors)
    restored = [r for r in caplog.records if "last good objects from the state directory" in r.getMessage()]
    assert len(restored) == 1 and restored[0].__dict__["fields"]["file"] == str(policy)


async def test_without_a_state_directory_a_restart_forgets(config: Path) -> None:
    """The failure the state directory exists for (and what the test above would see without it)."""
    await start(config, None)
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1") + "---\n" + deny(action="DENYY"))
    _, store = await start(config, None)
    assert DENY_KEY not in served(store)


async def test_a_restart_keeps_what_the_running_controller_kept(config: Path, state: str) -> None:
    """The policy went bad while the controller ran (its last good version kept), then a pod was edited: the saved
    record holds both the kept policy and the new pod, and a restart serves the same."""
    source, running = await start(config, state)
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1") + "---\n" + deny(action="DENYY"))
    await source.sync()
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.9") + "---\n" + deny(action="DENYY"))
    await source.sync()
    _, store = await start(config, state)
    assert served(store) == served(running) and DENY_KEY in served(store)
    assert store.translator.objects() == running.translator.objects()


async def test_objects_removed_on_purpose_do_not_come_back(config: Path, state: str) -> None:
    (config / "other.yaml").write_text(pod_yaml("p2", "10.0.0.2"))
    await start(config, state)
    (config / "other.yaml").unlink()  # file deleted while down
    write(config / "policy.yaml", pod_yaml("p1", "10.0.0.1"))  # document deleted while down, the file valid
    _, store = await start(config, state)
    assert served(store) == {"Namespace//demo", "Pod/demo/p1"}
    assert store.errors() == []
    # Their records went with them: a later bad edit of policy.yaml brings back only what it last served.
    records = [n for n in os.listdir(state) if n.endswith(SUFFIX)]
    assert len(records) == 2  # ns.yaml, policy.yaml
    write(config / "policy.yaml", "kind: [unclosed\n")
    _, store = await start(config, state)
    assert served(store) == {"Namespace//demo", "Pod/demo/p1"}


async def test_a_file_fixed_while_down_serves_its_new_content(config: Path, state: str) -> None:
    source, _ = await start(config, state)
    write(config / "policy.yaml", deny(action="DENYY"))
    await source.sync()  # kept the policy, saved so (p1 deleted)
    write(config / "policy.yaml", deny(action="ALLOW"))
    _, store = await start(config, state)
    assert served(store) == {"Namespace//demo", DENY_KEY}
    assert list(actions(store).values()) == [0]  # ALLOW


async def test_records_are_replaced_whole_and_a_bad_one_is_skipped(
    config: Path, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    await start(config, state)
    names = sorted(os.listdir(state))
    assert len(names) == 2 and all(n.endswith(SUFFIX) for n in names)  # no temp file left behind
    saved = LastGood(state).load(str(config))
    assert sorted(saved) == [str(config / "ns.yaml"), str(config / "policy.yaml")]
    assert saved[str(config / "policy.yaml")] == {"Pod/demo/p1": pod_yaml("p1", "10.0.0.1"), DENY_KEY: "\n" + deny()}
    for name in names:
        (Path(state) / name).write_text('{"format": 1, "source": ')  # torn by something other than us
    write(config / "policy.yaml", "kind: [unclosed\n")
    with caplog.at_level(logging.ERROR):
        _, store = await start(config, state)
    assert served(store) == {"Namespace//demo"}  # nothing to restore, nothing invented
    assert len([r for r in caplog.records if "record unreadable" in r.getMessage()]) == 2


async def test_an_unusable_state_directory_is_reported_and_config_still_serves(
    config: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")

    def failures() -> list[str]:
        return [r.__dict__["fields"]["error"] for r in caplog.records if "cannot keep the last good" in r.getMessage()]

    with caplog.at_level(logging.ERROR):
        source, store = await start(config, str(blocker / "state"))
        first = failures()
        for action in ("ALLOW", "DENY"):
            write(config / "policy.yaml", deny(action=action))
            await source.sync()
    assert served(store) == {"Namespace//demo", DENY_KEY}
    assert first and all("not-a-dir" in e for e in first)
    assert failures() == first  # each reason once, not once per write


# ---- wiring --------------------------------------------------------------------------------------------------------


def test_state_dir_flag_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = flags.parse(ControllerConfig, ["--config-dir", "/srv/ambit/config"])
    assert cfg.files_state_dir() == "/srv/ambit/.config.ambit-state" == default_state_dir("/srv/ambit/config/")
    monkeypatch.setenv("AMBIT_STATE_DIR", "/var/lib/ambit/controller")
    assert flags.parse(ControllerConfig, ["--config-dir", "c"]).files_state_dir() == "/var/lib/ambit/controller"
    cfg = flags.parse(ControllerConfig, ["--config-dir", "c", "--state-dir", "/elsewhere"])
    assert cfg.files_state_dir() == "/elsewhere"


# ---- files caught half-written -------------------------------------------------------------------------------------

PODS = [pod_yaml(f"p{i}", f"10.0.0.{i}") for i in (1, 2, 3)]


async def test_a_slow_writer_is_applied_only_once_it_stopped(tmp_path: Path) -> None:
    """``cat > file`` from a slow producer: truncated, then one document per pass, each stage valid YAML with fewer
    documents than the file had. No stage may take an object away; the finished file applies on the next pass."""
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text("---\n".join(PODS))
    store = new_store()
    source = FileSource(str(tmp_path), store)
    await source.sync()
    everything = {"Namespace//demo", "Pod/demo/p1", "Pod/demo/p2", "Pod/demo/p3"}
    final = [p.replace("10.0.0.", "10.0.9.") for p in PODS]
    for stage in range(len(final) + 1):
        write(pods, "---\n".join(final[:stage]))
        await source.sync(settle=True)
        assert served(store) == everything, f"stage {stage} of the write was applied"
    await source.sync(settle=True)  # the writer stopped: one pass later it is applied
    ips = {
        a.workload.name: a.workload.addresses[0][-2] for a in store.translator.addresses().values() if a.workload.name
    }
    assert ips == {"p1": 9, "p2": 9, "p3": 9}


def _old(path: Path) -> None:
    os.utime(path, (1_000_000_000, 1_000_000_000))


def _recent(path: Path) -> None:
    """Modified "in the future": recent at every check however long this (loaded) machine takes to get there; with
    the real time, a check more than one poll interval (10 ms here) after the write saw the file as holding still."""
    future = time.time() + 3600
    os.utime(path, (future, future))


async def test_start_waits_for_a_file_that_changes_after_it_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read half-written at start, served as is, agents would see the missing objects removed: the start looks
    again after an interval and serves the finished file."""
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(PODS[0])
    _recent(pods)  # modified just now: its writer may not be done
    _old(tmp_path / "ns.yaml")
    store = new_store()
    source = FileSource(str(tmp_path), store, poll_interval=0.01)
    calls: list[bool] = []
    real_sync = source.sync

    async def sync(settle: bool = False) -> int:
        applied = await real_sync(settle)
        if not calls:
            write(pods, "---\n".join(PODS))  # the writer finishes just after the first read
        calls.append(settle)
        return applied

    monkeypatch.setattr(source, "sync", sync)
    await source.initial_sync()
    assert served(store) == {"Namespace//demo", "Pod/demo/p1", "Pod/demo/p2", "Pod/demo/p3"}
    assert calls[0] is False and all(calls[1:])


async def test_start_reads_once_when_nothing_is_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    _old(tmp_path / "ns.yaml")
    source = FileSource(str(tmp_path), new_store(), poll_interval=0.01)
    passes: list[bool] = []
    real_sync = source.sync

    async def sync(settle: bool = False) -> int:
        passes.append(settle)
        return await real_sync(settle)

    monkeypatch.setattr(source, "sync", sync)
    await source.initial_sync()
    assert passes == [False]
    (tmp_path / "new.yaml").write_text(PODS[0])
    _recent(tmp_path / "new.yaml")  # just written: one more look before serving it
    passes.clear()
    source = FileSource(str(tmp_path), new_store(), poll_interval=0.01)
    real_sync = source.sync
    monkeypatch.setattr(source, "sync", sync)
    await source.initial_sync()
    assert passes[0] is False and len(passes) >= 2


async def test_start_gives_up_waiting_for_a_file_that_never_holds_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pods = tmp_path / "pods.yaml"

    def rewrite(text: str) -> None:
        write(pods, text)
        _recent(pods)

    rewrite(NS)
    store = new_store()
    source = FileSource(str(tmp_path), store, poll_interval=0.01)
    real_sync = source.sync
    passes: list[bool] = []

    async def sync(settle: bool = False) -> int:
        applied = await real_sync(settle)
        passes.append(settle)
        rewrite(NS + f"# rewrite {len(passes)}\n")
        return applied

    monkeypatch.setattr(source, "sync", sync)
    with caplog.at_level(logging.WARNING):
        await source.initial_sync(max_passes=3)
    assert len(passes) == 4
    assert served(store) == {"Namespace//demo"}
    assert any("kept changing during start" in r.getMessage() for r in caplog.records)


LIST_HEAD = "apiVersion: v1\nkind: List\nitems:\n"


def pod_list(*pods: str) -> str:
    """A v1 List (what kubectl get -o yaml writes) of the given pod documents, indented as items."""
    return LIST_HEAD + "".join("- " + p.replace("\n", "\n  ").rstrip() + "\n" for p in pods)


async def test_a_list_document_restores_the_items_it_served(config: Path, state: str) -> None:
    (config / "list.yaml").write_text(pod_list(pod_yaml("p2", "10.0.0.2"), pod_yaml("p3", "10.0.0.3")))
    source, _ = await start(config, state)
    write(config / "list.yaml", pod_list(pod_yaml("p2", "10.0.0.22"), pod_yaml("p3", "bad")))  # p3 kept
    await source.sync()
    write(config / "list.yaml", pod_list(pod_yaml("p2", "10.0.0.23"), pod_yaml("p3", "worse")))
    _, store = await start(config, state)
    ips = {a.workload.name: a.workload.addresses[0][-1] for a in store.translator.addresses().values()}
    assert ips == {"p1": 1, "p2": 23, "p3": 3}  # p2 as now written, p3 its last good version


async def test_a_saved_object_this_controller_refuses_is_not_restored(
    config: Path, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record written by another version (or by hand) is validated again: what fails is reported, not served."""
    LastGood(state).save(
        str(config / "policy.yaml"),
        {DENY_KEY: deny(action="DENYY"), "Pod/demo/p1": pod_yaml("p1", "10.0.0.1")},
    )
    write(config / "policy.yaml", "kind: [unclosed\n")
    with caplog.at_level(logging.ERROR):
        _, store = await start(config, state)
    assert served(store) == {"Namespace//demo", "Pod/demo/p1"}
    (lost,) = [r for r in caplog.records if "no longer valid" in r.getMessage()]
    assert lost.__dict__["fields"]["objects"] == [DENY_KEY]


async def test_a_file_read_as_recorded_is_not_written_again(
    config: Path, state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start(config, state)
    writes: list[str] = []
    real_save = LastGood.save

    def save(self: LastGood, source: str, objects: dict[str, str]) -> None:
        writes.append(source)
        real_save(self, source, objects)

    monkeypatch.setattr(LastGood, "save", save)
    source, _ = await start(config, state)
    assert writes == []
    write(config / "policy.yaml", deny())
    await source.sync()
    assert writes == [str(config / "policy.yaml")]


async def test_a_restart_while_a_subdirectory_cannot_be_listed_keeps_its_files_objects(
    config: Path, state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its files are not known to be gone: their saved objects serve, as a running controller keeps them, until the
    subdirectory can be listed again; then what is there applies, and what is not goes."""
    (config / "apps").mkdir()
    (config / "apps" / "a.yaml").write_text(pod_yaml("p2", "10.0.0.2"))
    (config / "apps" / "b.yaml").write_text(pod_yaml("p3", "10.0.0.3"))
    await start(config, state)
    real_scandir = os.scandir

    def scandir(path: str) -> Any:
        if str(path) == str(config / "apps"):
            raise OSError(5, "Input/output error")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    source, store = await start(config, state)
    assert {"Pod/demo/p2", "Pod/demo/p3"} <= served(store)
    assert sorted(store.errors()) == [
        f"{config / 'apps' / f}: cannot list {config / 'apps'}: Input/output error" for f in ("a.yaml", "b.yaml")
    ]
    await source.sync(settle=True)
    assert {"Pod/demo/p2", "Pod/demo/p3"} <= served(store)
    monkeypatch.setattr(os, "scandir", real_scandir)
    (config / "apps" / "b.yaml").unlink()  # deleted meanwhile
    write(config / "apps" / "a.yaml", pod_yaml("p2", "10.0.0.22"))
    for _ in range(3):
        await source.sync(settle=True)
    assert "Pod/demo/p3" not in served(store) and "Pod/demo/p2" in served(store)
    assert store.errors() == []
    assert sorted(LastGood(state).load(str(config))) == sorted(
        str(config / f) for f in ("ns.yaml", "policy.yaml", "apps/a.yaml")
    )
