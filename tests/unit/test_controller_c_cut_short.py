"""A config file caught half-written by a writer that paused longer than the poll interval (a shell's ``> file``
before its command writes, a buffered writer stalled mid-file) must not take the objects of its missing part away:
a file that looks cut short applies its changes but removes nothing it served until it has held still for
``cut_short_wait``. Time is an injected clock, never a sleep."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common import flags
from controller.main import ControllerConfig
from controller.monitoring import ControllerMetrics
from controller.sources.files import FileSource
from controller.sources.rejected import looks_cut_short
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.config_files import NS, pod_yaml, served, write

P1, P2, P3 = pod_yaml("p1", "10.0.0.1"), pod_yaml("p2", "10.0.0.2"), pod_yaml("p3", "10.0.0.3")
FULL = "---\n".join([P1, P2, P3])
ALL = {"Namespace//demo", "Pod/demo/p1", "Pod/demo/p2", "Pod/demo/p3"}


def cut(text: str) -> bool:
    return looks_cut_short(text, parse_yaml_text("f.yaml", text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(FULL, False, id="whole"),
        pytest.param("", True, id="empty"),
        pytest.param("# nothing yet\n\n", True, id="no-document"),
        pytest.param(FULL[: FULL.index("10.0.0.3")], True, id="mid-line"),
        pytest.param(FULL[: FULL.index("metadata: {name: p3")], True, id="line-end-last-document-invalid"),
        # Not detectable: a cut at a line's end that leaves a valid document (this pod, without its address).
        pytest.param(FULL[: FULL.index("status: {podIP: 10.0.0.3}")], False, id="line-end-last-document-valid"),
        pytest.param(FULL.rstrip("\n"), True, id="no-final-newline"),
        pytest.param(P1 + "---\nkind: [x\n---\n" + P3, False, id="invalid-in-the-middle"),
        pytest.param(FULL[: FULL.index("apiVersion: v1\nkind: Pod\nmetadata: {name: p3")], False, id="between-docs"),
    ],
)
def test_what_looks_cut_short(text: str, expected: bool) -> None:
    assert cut(text) is expected


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    root.mkdir()
    (root / "ns.yaml").write_text(NS)
    (root / "pods.yaml").write_text(FULL)
    return root


async def start(config: Path, clock: Clock, state: str | None = None) -> tuple[FileSource, ConfigStore]:
    store = ConfigStore(Translator(), ControllerMetrics())
    source = FileSource(str(config), store, state_dir=state, cut_short_wait=5.0, clock=clock)
    await source.sync()
    return source, store


def ip_of(store: ConfigStore, name: str) -> bytes:
    addresses = store.translator.addresses().values()
    return next(a.workload.addresses[0] for a in addresses if a.HasField("workload") and a.workload.name == name)


@pytest.mark.parametrize(
    "half",
    [
        pytest.param("", id="emptied"),
        pytest.param(P1.replace("10.0.0.1", "10.0.0.9") + "---\n" + P2[:40], id="mid-line"),
    ],
)
async def test_a_half_written_file_removes_nothing_until_it_held_still(
    config: Path, half: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    source, store = await start(config, clock)
    pods = config / "pods.yaml"
    with caplog.at_level(logging.WARNING):
        write(pods, half)
        await source.sync()
    assert served(store) == ALL
    if half:
        assert ip_of(store, "p1") == bytes([10, 0, 0, 9])  # what it does hold applies at once
    (warning,) = [r for r in caplog.records if "looks cut short" in r.getMessage()]
    assert warning.__dict__["fields"] == {"file": str(pods), "wait_seconds": 5.0}
    clock.now += 4.9
    await source.sync()
    assert served(store) == ALL
    write(pods, FULL)  # the writer finishes: nothing was ever removed
    await source.sync()
    assert served(store) == ALL and store.errors() == []
    assert ip_of(store, "p1") == bytes([10, 0, 0, 1])
    clock.now += 60
    await source.sync()
    assert served(store) == ALL


async def test_a_file_that_holds_still_cut_short_is_applied_in_full(config: Path) -> None:
    """A file really emptied, or really saved without its final newline, is what its user meant: once it held
    still for the wait, its removals apply, as would a broken last document's (that object alone kept)."""
    clock = Clock()
    source, store = await start(config, clock)
    pods = config / "pods.yaml"
    write(pods, P1 + "---\n" + P2.replace("kind: Pod", "kind: Podd"))  # p3 deleted, p2 broken (last)
    await source.sync()
    assert served(store) == ALL
    clock.now += 5
    assert await source.sync() == 1
    assert served(store) == ALL - {"Pod/demo/p3"}  # p2 held: its document is broken
    assert store.status()["objects"]["Pod/demo/p2"]["status"] == "stale"
    write(pods, P1.rstrip("\n"))  # p2 deleted too, no final newline
    await source.sync()
    assert served(store) == ALL - {"Pod/demo/p3"}
    clock.now += 5
    await source.sync()
    assert served(store) == {"Namespace//demo", "Pod/demo/p1"}
    write(pods, "")
    await source.sync()
    clock.now += 5
    await source.sync()
    assert served(store) == {"Namespace//demo"}


async def test_the_wait_restarts_while_the_file_is_still_being_written(config: Path) -> None:
    clock = Clock()
    source, store = await start(config, clock)
    pods = config / "pods.yaml"
    write(pods, "")
    await source.sync(settle=True)  # seen changing: not read yet
    await source.sync(settle=True)  # held still one pass: read, cut short
    assert served(store) == ALL
    clock.now += 6  # its wait is over, but the writer goes on just now
    write(pods, "# wri")
    await source.sync(settle=True)  # seen changing: the empty read is not applied in full
    assert served(store) == ALL
    await source.sync(settle=True)  # read: still no document, a new wait
    assert served(store) == ALL
    clock.now += 5
    await source.sync(settle=True)
    assert served(store) == {"Namespace//demo"}


async def test_a_restart_while_a_file_is_cut_short_serves_what_it_served(config: Path, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    clock = Clock()
    await start(config, clock, state)
    # The controller restarts while the writer is paused in p2's document.
    write(config / "pods.yaml", P1 + "---\n" + P2[: P2.index("spec") + 3])
    source, store = await start(config, clock, state)
    assert served(store) == ALL
    clock.now += 5
    await source.sync()
    assert served(store) == ALL - {"Pod/demo/p3"}  # p2's document stayed cut: held as a broken document


def test_cut_short_wait_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert flags.parse(ControllerConfig, ["--config-dir", "x"]).cut_short_wait == 5.0
    assert flags.parse(ControllerConfig, ["--config-dir", "x", "--cut-short-wait", "0"]).cut_short_wait == 0.0
    monkeypatch.setenv("AMBIT_CUT_SHORT_WAIT", "12.5")
    assert flags.parse(ControllerConfig, ["--config-dir", "x"]).cut_short_wait == 12.5
    with pytest.raises(SystemExit):
        flags.parse(ControllerConfig, ["--config-dir", "x", "--cut-short-wait", "-1"])
    assert "--cut-short-wait: must not be negative" in capsys.readouterr().err
