"""agent.pod_netns with setns injected: the way back failing, the miss cache's clock, namespaces it cannot enter.

The "namespaces" are plain files and the fake setns moves nothing, so sockets are made in the test's own netns:
127.0.0.1 binds (the address "is there"), 192.0.2.1 (TEST-NET-1) does not.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import pod_netns
from agent.pod_netns import PodNetnsConfig, PodNetnsError, PodNetworks

HERE = "127.0.0.1"
NOWHERE = "192.0.2.1"


class FakeSetns:
    """Records every setns; fails entering the fds in `refuse`, and going home once `strand` is set."""

    def __init__(self) -> None:
        self.home = -1
        self.calls: list[int] = []
        self.refuse: set[int] = set()
        self.strand = False

    def __call__(self, fd: int) -> None:
        self.calls.append(fd)
        if fd in self.refuse or (self.strand and fd == self.home):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    def entered(self) -> list[int]:
        return [fd for fd in self.calls if fd != self.home]


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    for name in ["pod-a", "pod-b", "other-c"]:
        (tmp_path / name).write_text("")
    return tmp_path


@pytest.fixture
def fake() -> FakeSetns:
    return FakeSetns()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def exits() -> list[int]:
    return []


@pytest.fixture
def pods(
    dirs: Path, fake: FakeSetns, clock: Clock, exits: list[int], monkeypatch: pytest.MonkeyPatch
) -> Iterator[PodNetworks]:
    made = PodNetworks(
        PodNetnsConfig(dirs=(str(dirs),), prefix="pod-", rescan_interval=1.0),
        clock=clock,
        setns=fake,
        exit_process=exits.append,
    )
    fake.home = made._home
    fake.calls.clear()
    monkeypatch.setattr(made, "_binds_anything", lambda ns, family: False)  # the host's sysctl is not the test's
    yield made
    made.close()


def test_failing_to_go_home_ends_the_process_with_70_and_logs_critical(
    pods: PodNetworks, fake: FakeSetns, exits: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    fake.strand = True
    before = len(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.CRITICAL, logger="agent.pod_netns"), pytest.raises(PodNetnsError):
        pods.bound_socket(HERE)  # the hook returned (a test's hook does): the call still fails
    assert exits == [pod_netns.STRANDED_EXIT_CODE]
    assert [r.levelno for r in caplog.records] == [logging.CRITICAL]
    fields = caplog.records[0].fields  # type: ignore[attr-defined]
    assert fields["errno"] == errno.EPERM
    assert os.path.basename(fields["netns"]) in {"pod-a", "pod-b"}
    assert len(os.listdir("/proc/self/fd")) == before  # the socket made inside and the netns fd are closed


def test_the_default_exit_hook_is_os_exit() -> None:
    made = PodNetworks(PodNetnsConfig(dirs=()), setns=lambda fd: None)
    try:
        assert made._exit is os._exit
    finally:
        made.close()


def test_a_process_that_may_not_setns_fails_at_construction() -> None:
    def refuse(fd: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(PodNetnsError, match="Operation not permitted"):
        PodNetworks(setns=refuse)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_miss_is_remembered_for_the_rescan_interval(pods: PodNetworks, fake: FakeSetns, clock: Clock) -> None:
    assert pods.bound_socket(NOWHERE) is None
    assert len(fake.entered()) == 2  # pod-a and pod-b; other-c is outside the prefix
    fake.calls.clear()
    clock.now += 0.99
    assert pods.bound_socket(NOWHERE) is None
    assert fake.calls == []
    clock.now += 0.01
    assert pods.bound_socket(NOWHERE) is None
    assert len(fake.entered()) == 2
    assert len(pods) == 0


def test_a_miss_of_one_address_does_not_hold_back_another(pods: PodNetworks, fake: FakeSetns) -> None:
    assert pods.bound_socket(NOWHERE) is None
    sock = pods.bound_socket(HERE)
    assert sock is not None
    sock.close()
    assert len(pods) == 1


def test_a_hit_enters_the_cached_netns_once_and_comes_back(pods: PodNetworks, fake: FakeSetns) -> None:
    first = pods.bound_socket(HERE)
    assert first is not None
    first.close()
    fake.calls.clear()
    sock = pods.bound_socket(HERE)
    assert sock is not None
    with sock:
        assert sock.getblocking() is False
        assert sock.getsockname()[0] == HERE
        assert sock.getsockname()[1] > 0
    assert len(fake.calls) == 2
    assert fake.calls[1] == fake.home


def test_a_netns_that_cannot_be_entered_is_skipped_and_not_held(
    pods: PodNetworks, fake: FakeSetns, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: dict[str, str] = {}
    real_open = os.open

    def spy_open(path: str, flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        name = opened.setdefault("first", os.path.basename(path))  # refuse the first tried, whichever it is
        if os.path.basename(path) == name:
            fake.refuse.add(fd)
        else:
            fake.refuse.discard(fd)  # a closed fd's number comes back for the next file
        return fd

    monkeypatch.setattr(pod_netns.os, "open", spy_open)
    with caplog.at_level(logging.DEBUG, logger="agent.pod_netns"):
        sock = pods.bound_socket(HERE)
    assert sock is not None
    sock.close()
    refused = opened["first"]
    assert "cannot enter a netns; skipping it" in [r.getMessage() for r in caplog.records]
    assert [os.path.basename(ns.path) for ns in pods._held.values()] == list({"pod-a", "pod-b"} - {refused})
    assert fake.calls[-1] == fake.home


def test_a_netns_whose_entry_is_deleted_is_released_at_the_next_scan(pods: PodNetworks) -> None:
    sock = pods.bound_socket(HERE)
    assert sock is not None
    sock.close()
    (held,) = pods._held.values()
    os.unlink(held.path)
    assert pods.bound_socket(NOWHERE) is None
    assert len(pods) == 0
    assert held.fd == -1


def test_forget_and_close(pods: PodNetworks, fake: FakeSetns) -> None:
    pods.forget(NOWHERE)  # never seen: nothing to do
    sock = pods.bound_socket(HERE)
    assert sock is not None
    sock.close()
    (held,) = pods._held.values()
    pods.forget(HERE)
    assert (len(pods), held.fd) == (0, -1)
    pods.close()
    with pytest.raises(PodNetnsError):
        pods.bound_socket(HERE)
    assert fake.calls[-1] == fake.home


def test_the_miss_cache_stays_bounded(pods: PodNetworks, clock: Clock) -> None:
    """Misses are kept per address; a crowd of unknown addresses must not grow the cache without end."""
    for i in range(pod_netns._MAX_MISSES):
        assert pods.bound_socket(f"198.18.{i // 256}.{i % 256}") is None
    assert len(pods._missed) == pod_netns._MAX_MISSES
    clock.now += 5
    assert pods.bound_socket("198.51.100.1") is None
    assert list(pods._missed) == ["198.51.100.1"]


def test_a_directory_named_twice_through_a_symlink_is_scanned_once(
    dirs: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """/var/run -> /run: the default dirs are one directory on most hosts; its entries are stat()ed once."""
    alias = tmp_path_factory.mktemp("alias") / "netns"
    alias.symlink_to(dirs)
    fake = FakeSetns()
    made = PodNetworks(PodNetnsConfig(dirs=(str(alias), str(dirs)), prefix="pod-"), setns=fake)
    fake.home = made._home
    fake.calls.clear()
    stats: list[str] = []
    real_stat = os.stat

    def spy_stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        stats.append(os.path.basename(path))
        return real_stat(path)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pod_netns.os, "stat", spy_stat)
            assert made.bound_socket(NOWHERE) is None
        assert sorted(stats) == ["pod-a", "pod-b"]
        assert len(fake.entered()) == 2
    finally:
        made.close()
