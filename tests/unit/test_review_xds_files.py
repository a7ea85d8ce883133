"""The directory source under the ways files really change: editors that save by renaming the old file away,
renames, and ConfigMap volumes (``..data`` symlink swaps). The rule under test: nothing that was serving goes away
for a moment because a file was briefly missing or being replaced."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from controller.monitoring import ControllerMetrics
from controller.sources.files import FileSource
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.config_files import NS, bump_mtime, pod_yaml


def workloads(store: ConfigStore) -> dict[str, str]:
    return {
        a.workload.name: ".".join(map(str, a.workload.addresses[0]))
        for a in store.translator.addresses().values()
        if a.HasField("workload")
    }


@pytest.fixture
def store() -> ConfigStore:
    return ConfigStore(Translator(), ControllerMetrics())


async def test_save_by_rename_never_takes_the_objects_away(tmp_path: Path, store: ConfigStore) -> None:
    """vim (backupcopy=no), JetBrains safe-write and others move the old file away, then write the new one: between
    the two, the file does not exist. A pass that sees that moment must not remove what the file serves."""
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    assert workloads(store) == {"p1": "10.0.0.1"}
    seen = []
    pods.rename(tmp_path / "pods.yaml~")  # the backup is not a config file (suffix)
    await src.sync(settle=True)  # the watch passes while the file is missing
    seen.append(workloads(store))
    pods.write_text(pod_yaml("p1", "10.0.0.2"))
    bump_mtime(pods)
    for _ in range(3):
        await src.sync(settle=True)
        seen.append(workloads(store))
    assert seen[0] == {"p1": "10.0.0.1"}, "the file's objects were removed while the editor was saving"
    assert all(s for s in seen) and seen[-1] == {"p1": "10.0.0.2"}


async def test_a_file_that_stays_deleted_is_removed_on_the_next_pass(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.unlink()
    await src.sync(settle=True)
    assert workloads(store) == {"p1": "10.0.0.1"}  # might be an editor's save: held for one pass
    assert await src.sync(settle=True) == 1
    assert workloads(store) == {}
    assert await src.sync(settle=True) == 0  # reported once


async def test_a_deleted_file_with_a_pending_edit_is_still_removed(tmp_path: Path, store: ConfigStore) -> None:
    """A file edited (not settled yet) and then deleted: its applied contribution must still go."""
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.write_text(pod_yaml("p1", "10.0.0.7"))
    bump_mtime(pods)
    await src.sync(settle=True)  # seen changed, not settled
    pods.unlink()
    for _ in range(3):
        await src.sync(settle=True)
    assert workloads(store) == {}


async def test_renamed_file_moves_its_objects_without_a_gap_or_a_duplicate(
    tmp_path: Path, store: ConfigStore, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    (tmp_path / "b-pods.yaml").write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    (tmp_path / "b-pods.yaml").rename(tmp_path / "a-pods.yaml")
    seen = []
    with caplog.at_level(logging.WARNING, logger="ambit.controller.config"):
        for _ in range(3):
            await src.sync(settle=True)
            seen.append(workloads(store))
    assert all(s == {"p1": "10.0.0.1"} for s in seen), seen
    assert store.sources() == sorted([str(tmp_path / "a-pods.yaml"), str(tmp_path / "ns.yaml")])
    assert not [r for r in caplog.records if "duplicate" in r.getMessage()]


def _configmap_write(root: Path, files: dict[str, str], generation: int) -> None:
    """What kubelet's atomic writer does for a ConfigMap volume: a new timestamped directory, a ``..data`` symlink
    swapped to it by rename, one top-level symlink per key, stale keys' symlinks removed, the old directory
    deleted."""
    new = root / f"..2024_01_01_00_00_0{generation}.000000001"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    tmp = root / "..data_tmp"
    tmp.symlink_to(new.name)
    tmp.rename(root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    for link in root.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()
    if old is not None:
        for f in (root / old).iterdir():
            f.unlink()
        (root / old).rmdir()


async def test_configmap_volume_updates_apply_through_the_data_symlink_swap(tmp_path: Path, store: ConfigStore) -> None:
    _configmap_write(tmp_path, {"ns.yaml": NS, "pods.yaml": pod_yaml("p1", "10.0.0.1")}, 1)
    src = FileSource(str(tmp_path), store)
    await src.sync()
    assert workloads(store) == {"p1": "10.0.0.1"}
    assert store.sources() == sorted([str(tmp_path / "ns.yaml"), str(tmp_path / "pods.yaml")])  # not ..data paths
    # An edit of one key and a new key in one ConfigMap update.
    _configmap_write(
        tmp_path, {"ns.yaml": NS, "pods.yaml": pod_yaml("p1", "10.0.0.2"), "more.yaml": pod_yaml("p2", "10.0.0.3")}, 2
    )
    seen = []
    for _ in range(3):
        await src.sync(settle=True)
        seen.append(workloads(store))
    assert all("p1" in s for s in seen)
    assert seen[-1] == {"p1": "10.0.0.2", "p2": "10.0.0.3"}
    # A key dropped from the ConfigMap: its objects go, the rest stay.
    _configmap_write(tmp_path, {"ns.yaml": NS, "pods.yaml": pod_yaml("p1", "10.0.0.2")}, 3)
    for _ in range(3):
        await src.sync(settle=True)
    assert workloads(store) == {"p1": "10.0.0.2"}
    assert store.errors() == []


async def test_an_unreadable_file_that_is_then_deleted_is_removed(tmp_path: Path, store: ConfigStore) -> None:
    """An unreadable file keeps its last contribution serving and is retried each pass; deleting it must still take
    that contribution away (it stayed in the store for the controller's lifetime)."""
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.write_bytes(b"\xff\xfe not text")
    bump_mtime(pods)
    for _ in range(2):
        await src.sync(settle=True)
    assert workloads(store) == {"p1": "10.0.0.1"}  # last good contribution kept
    assert any("not UTF-8" in e for e in store.errors())
    pods.unlink()
    for _ in range(3):
        await src.sync(settle=True)
    assert workloads(store) == {}
    assert store.errors() == []
    assert store.sources() == [str(tmp_path / "ns.yaml")]


async def test_an_unreadable_file_is_retried_quietly(
    tmp_path: Path, store: ConfigStore, caplog: pytest.LogCaptureFixture
) -> None:
    """It is re-read every pass (a permission fix changes no signature), but logged once per new error: it logged
    'config file loaded' five times a second for as long as it stayed unreadable."""
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_bytes(b"\xff\xfe not text")
    src = FileSource(str(tmp_path), store)
    with caplog.at_level(logging.INFO, logger="ambit.controller.files"):
        await src.sync()
        for _ in range(5):
            await src.sync(settle=True)
        loaded = [r for r in caplog.records if r.getMessage() == "config file loaded" and "pods" in str(r.__dict__)]
        assert len(loaded) == 1, [r.__dict__ for r in loaded]
        assert any("not UTF-8" in e for e in store.errors())
        pods.write_text(pod_yaml("p1", "10.0.0.1"))  # readable again: applied
        bump_mtime(pods)
        for _ in range(2):
            await src.sync(settle=True)
    assert workloads(store) == {"p1": "10.0.0.1"}
    assert store.errors() == []


async def test_a_subdirectory_that_cannot_be_listed_keeps_its_files_serving(
    tmp_path: Path, store: ConfigStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O or permission error listing a subdirectory made its files look deleted, and their objects were removed
    from every agent. Its known files now stay as they were; the rest of the tree still applies; a subdirectory
    that is really gone takes its files with it."""
    (tmp_path / "ns.yaml").write_text(NS)
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "pods.yaml").write_text(pod_yaml("p1", "10.0.0.1"))
    (tmp_path / "lost+found").mkdir()  # never listable by the controller, never held config
    src = FileSource(str(tmp_path), store)
    await src.sync()
    real_scandir = os.scandir
    broken = {str(tmp_path / "apps"): OSError(5, "Input/output error"), str(tmp_path / "lost+found"): None}

    def scandir(path: Any) -> Any:
        if str(path) in broken:
            raise broken[str(path)] or PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.INFO, logger="ambit.controller.files"):
        (tmp_path / "more.yaml").write_text(pod_yaml("p2", "10.0.0.2"))
        for _ in range(3):
            await src.sync(settle=True)
        assert workloads(store) == {"p1": "10.0.0.1", "p2": "10.0.0.2"}
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2  # each subdirectory once, not once a pass
        monkeypatch.setattr(os, "scandir", real_scandir)
        (tmp_path / "apps" / "pods.yaml").unlink()
        (tmp_path / "apps").rmdir()  # really gone: its files go
        for _ in range(3):
            await src.sync(settle=True)
    assert workloads(store) == {"p2": "10.0.0.2"}
    assert any(r.getMessage() == "config entry listed again" for r in caplog.records)
