"""The directory source: multi-document and nested files, edits, deletions, unreadable and malformed files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.model import Pod
from controller.monitoring import ControllerMetrics
from controller.sources.files import ConfigDirError, FileSource
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.config_files import NS, bump_mtime, pod_yaml


def workloads(store: ConfigStore) -> dict[str, bytes]:
    return {
        a.workload.name: a.workload.addresses[0]
        for a in store.translator.addresses().values()
        if a.HasField("workload")
    }


@pytest.fixture
def store() -> ConfigStore:
    return ConfigStore(Translator(), ControllerMetrics())


async def test_multi_document_and_nested_files(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    (tmp_path / "apps" / "deep").mkdir(parents=True)
    (tmp_path / "apps" / "deep" / "pods.yml").write_text(
        pod_yaml("p1", "10.0.0.1") + "---\n" + pod_yaml("p2", "10.0.0.2")
    )
    (tmp_path / "apps" / "README.md").write_text("not config")
    (tmp_path / ".hidden.yaml").write_text(pod_yaml("hidden", "10.0.0.3"))
    src = FileSource(str(tmp_path), store)
    assert await src.sync() == 2
    assert set(workloads(store)) == {"p1", "p2"}
    assert await src.sync() == 0  # nothing changed, nothing re-read


async def test_edit_delete_and_same_size_rewrite(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.write_text(pod_yaml("p1", "10.0.0.7"))  # same size, new content
    bump_mtime(pods)
    await src.sync()
    assert workloads(store) == {"p1": bytes([10, 0, 0, 7])}
    pods.unlink()
    await src.sync()
    assert workloads(store) == {}
    assert store.sources() == [str(tmp_path / "ns.yaml")]


async def test_malformed_yaml_keeps_previous_and_names_file(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1") + "---\n" + pod_yaml("p2", "10.0.0.2"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.write_text(pod_yaml("p1", "10.0.0.1") + "---\nkind: Pod\nmetadata: [unclosed\n")
    await src.sync()
    assert set(workloads(store)) == {"p1", "p2"}
    errors = store.errors()
    assert len(errors) == 1 and errors[0].startswith(f"{pods}:") and "invalid YAML" in errors[0], errors


async def test_undecodable_file_keeps_previous(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.write_bytes(b"\xff\xfe garbage")
    await src.sync()
    assert set(workloads(store)) == {"p1"}
    assert store.errors() == [f"{pods}: not UTF-8 text: invalid start byte at byte 0"]
    pods.write_text(pod_yaml("p1", "10.0.0.5"))
    await src.sync()
    assert workloads(store) == {"p1": bytes([10, 0, 0, 5])}
    assert store.errors() == []


async def test_malformed_values_are_errors_and_other_files_still_apply(tmp_path: Path, store: ConfigStore) -> None:
    """A list where a string belongs, or a NUL in an address (YAML's "\\0"), used to raise out of the scan: no file
    changed in that pass applied, and the pass was retried (and failed) every interval until the file was fixed."""
    (tmp_path / "ns.yaml").write_text(NS)
    (tmp_path / "a.yaml").write_text(pod_yaml("p1", "10.0.0.1"))
    bad = tmp_path / "b.yaml"
    bad.write_text("apiVersion: v1\nkind: [Pod]\nmetadata: {name: x}\n---\n" + pod_yaml("p2", '"10.0.0.2\\0"'))
    src = FileSource(str(tmp_path), store)
    assert await src.sync() == 3
    assert set(workloads(store)) == {"p1"}
    assert sorted(store.errors()) == [
        f"{bad}:?/default/x: kind: must be a string, got a list",
        f"{bad}:Pod/demo/p2: status.podIP: '10.0.0.2\\x00' is not a valid IP address",
    ]


async def test_missing_directory_is_an_error(tmp_path: Path, store: ConfigStore) -> None:
    with pytest.raises(ConfigDirError, match="cannot list config directory"):
        await FileSource(str(tmp_path / "nope"), store).sync()


async def test_run_follows_changes(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    src = FileSource(str(tmp_path), store, poll_interval=0.05)
    await src.sync()
    task = asyncio.create_task(src.run())
    try:
        (tmp_path / "pods.yaml").write_text(pod_yaml("p9", "10.0.0.9"))
        for _ in range(200):
            if workloads(store):
                break
            await asyncio.sleep(0.05)
        assert workloads(store) == {"p9": bytes([10, 0, 0, 9])}
    finally:
        task.cancel()


async def test_watch_applies_a_change_only_once_it_settled(tmp_path: Path, store: ConfigStore) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    pods = tmp_path / "pods.yaml"
    pods.write_text(pod_yaml("p1", "10.0.0.1"))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    pods.write_text("")  # a writer that truncated the file and has not written yet
    assert await src.sync(settle=True) == 0  # first sight of the new signature: wait
    pods.write_text(pod_yaml("p1", "10.0.0.2") + "---\n" + pod_yaml("p2", "10.0.0.3"))
    bump_mtime(pods)
    assert await src.sync(settle=True) == 0  # changed again since the last pass: still wait
    assert workloads(store) == {"p1": bytes([10, 0, 0, 1])}  # the truncated state was never applied
    assert await src.sync(settle=True) == 1
    assert workloads(store) == {"p1": bytes([10, 0, 0, 2]), "p2": bytes([10, 0, 0, 3])}
    (tmp_path / "ns.yaml").unlink()
    assert await src.sync(settle=True) == 0  # a missing file might be an editor's save: held for one pass
    assert await src.sync(settle=True) == 1  # still missing: removed


def test_document_cache_reloads_only_edited_documents() -> None:
    cache: dict[str, Any] = {}
    first = parse_yaml_text("f.yaml", NS + "---\n" + pod_yaml("p1", "10.0.0.1"), cache)
    assert not first.errors and len(cache) == 2
    ns_doc = next(v for k, v in cache.items() if "Namespace" in k)
    second = parse_yaml_text("f.yaml", NS + "---\n" + pod_yaml("p1", "10.0.0.2"), cache)
    assert not second.errors and len(cache) == 2
    assert next(v for k, v in cache.items() if "Namespace" in k) is ns_doc  # reused, not re-loaded
    assert any(isinstance(o, Pod) and o.ips == ("10.0.0.2",) for o in second.objects)
    broken = parse_yaml_text("f.yaml", NS + "---\nkind: [oops\n", cache)
    assert "invalid YAML" in str(broken.errors[0]) and len(cache) == 1


async def test_edit_of_a_large_file_reuses_unchanged_documents(tmp_path: Path, store: ConfigStore) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text(NS + "---\n" + "---\n".join(pod_yaml(f"p{i}", f"10.0.1.{i}") for i in range(50)))
    src = FileSource(str(tmp_path), store)
    await src.sync()
    (cache,) = src._doc_caches.values()
    before = dict(cache)
    pods.write_text(NS + "---\n" + "---\n".join(pod_yaml(f"p{i}", f"10.0.1.{i if i else 99}") for i in range(50)))
    bump_mtime(pods)
    await src.sync()
    assert workloads(store)["p0"] == bytes([10, 0, 1, 99])
    reused = [k for k, v in cache.items() if k in before and before[k] is v]
    assert len(reused) == 50 and len(cache) == 51
    pods.unlink()
    await src.sync()
    assert src._doc_caches == {}
