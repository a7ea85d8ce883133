"""The DNAT capture table's no-listener counters are read by one command and one reading of its outcome, run two
ways: blocking, by DnatCapture in the reconcile's worker thread (before it rewrites or removes the table, and right
after it wrote one), and as an asyncio subprocess, by the metrics poller. These pin that both ways run the same
command line in the same environment and read every outcome alike (a listing, no table, an error, garbage, an nft
that hangs), and that the counters' series exist as soon as the table is written, not a poll interval later.

Without a kernel: nft is a shell stand-in that keeps the table it is given and lists it (text, or JSON with
counters at 0, as nft 1.0 prints it). The real table is in tests/integration/test_review_t2_dnat_first_sample.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from agent.capture_dnat import CounterRead, DnatCapture, NoListenerCounts, no_listener_counts, table_name
from agent.capture_dnat_metrics import DnatCounterCollector
from tests.unit.test_telemetry_t_dnat_counts import listing


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _recording_nft(tmp_path: Path, body: str) -> str:
    """An nft that appends its arguments and LC_ALL to ``calls`` and then runs ``body``."""
    calls = tmp_path / "calls"
    return _script(tmp_path / "nft", f'echo "$* LC_ALL=$LC_ALL" >> "{calls}"\n{body}')


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


OUTCOMES = {
    "listing": (f"echo '{listing(3, 7, 2)}'", None, {("ipv4", "drop"): 7, ("ipv6", "drop"): 2}),
    "no table": ("echo 'Error: Could not process rule: No such file or directory' >&2; exit 1", None, {}),
    "refused": ("echo 'Error: Operation not permitted' >&2; exit 1", "Operation not permitted", {}),
    "silent failure": ("exit 3", "exited with 3", {}),
    "garbage": ("echo '{\"nftables\": 3}'", "not an nft JSON listing", {}),
}


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
async def test_blocking_and_async_reads_run_one_command_and_read_its_outcome_alike(
    tmp_path: Path, outcome: str
) -> None:
    body, error, counts = OUTCOMES[outcome]
    nft = _recording_nft(tmp_path, body)
    blocking = CounterRead("ambit_t2", NoListenerCounts(), nft=nft)
    asynchronous = CounterRead("ambit_t2", NoListenerCounts(), nft=nft)
    results = [blocking.blocking(), await asynchronous.run()]
    for result in results:
        assert (result is None) == (error is None), result
        if error is not None:
            assert result is not None and error in result
    assert blocking.counts.totals() == asynchronous.counts.totals() == counts
    first, second = _calls(tmp_path)
    assert first == second == "-j list table inet ambit_t2 LC_ALL=C"  # nft's errors in English: read by their text


async def test_an_nft_that_hangs_is_killed_either_way(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    nft = _script(tmp_path / "nft", f'echo $$ >> "{pids}"; exec sleep 60')
    read = CounterRead("ambit_t2", NoListenerCounts(), nft=nft, timeout=0.3)
    for result in (read.blocking(), await read.run()):
        assert result is not None and "more than 0.3 s" in result
    for pid in pids.read_text().split():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)  # killed and reaped, not left behind


def _table_nft(tmp_path: Path) -> str:
    """An nft that keeps the table ``-f -`` gives it, lists it as text (``--stateless``) and as JSON with its two
    no-listener counters at 0 (``-j``), and says 'No such file or directory' while there is none."""
    table = tmp_path / "table"
    return _recording_nft(
        tmp_path,
        f'if [ "$1" = "-f" ]; then cat > "{table}"; exit 0; fi\n'
        f'if [ ! -f "{table}" ]; then echo "Error: No such file or directory" >&2; exit 1; fi\n'
        f'if [ "$1" = "-j" ]; then echo \'{listing(5, 0, 0)}\'; exit 0; fi\n'
        f'exec cat "{table}"',
    )


async def test_the_counters_series_exist_as_soon_as_the_table_is_written(tmp_path: Path) -> None:
    instance = f"t2first{os.getpid()}"
    capture = DnatCapture(instance, port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00, nft=_table_nft(tmp_path))
    collector = DnatCounterCollector(instance, nft=str(tmp_path / "unused"))
    assert collector.counts is capture.counts
    capture.sync({"10.0.0.1"})
    # No poll yet (the poller's first read came before the table and the next is 15 s away): the sync read the
    # table it wrote, so the series are there at 0, and the first SYN dropped is an increase a query can see.
    family = next(f for f in collector.collect() if f.name == "ambit_capture_dnat_no_listener_packets")
    assert {(s.labels["family"], s.labels["action"]): s.value for s in family.samples} == {
        ("ipv4", "drop"): 0,
        ("ipv6", "drop"): 0,
    }
    assert "-j list table inet " + table_name(instance) + " LC_ALL=C" in _calls(tmp_path)
    assert no_listener_counts(table_name(instance)) is capture.counts
    capture.sync({"10.0.0.1"})  # unchanged: one stateless read, no -j read
    assert _calls(tmp_path)[-1].startswith("--stateless list table")


def test_a_sync_whose_counter_read_fails_still_writes_the_table(tmp_path: Path) -> None:
    table = tmp_path / "table"
    nft = _script(
        tmp_path / "nft",
        f'if [ "$1" = "-f" ]; then cat > "{table}"; exit 0; fi\n'
        'if [ "$1" = "-j" ]; then echo "Error: Operation not permitted" >&2; exit 1; fi\n'
        f'[ -f "{table}" ] && exec cat "{table}"\nexit 1',
    )
    capture = DnatCapture("t2fail", port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00, nft=nft)
    capture.sync({"10.0.0.1"})
    assert "10.0.0.1" in table.read_text()
    assert json.dumps(capture.counts.totals()) == "{}"


def test_a_counter_read_that_keeps_failing_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An nft built without JSON support fails every ``-j`` read while it writes the table: the sync reads the
    counters before and after each write, so each write logged twice, every reconcile of a changed set."""
    table = tmp_path / "table"
    nft = _script(
        tmp_path / "nft",
        f'if [ "$1" = "-f" ]; then cat > "{table}"; exit 0; fi\n'
        'if [ "$1" = "-j" ]; then echo "Error: JSON support not compiled-in" >&2; exit 1; fi\n'
        f'[ -f "{table}" ] && exec cat "{table}"\nexit 1',
    )
    capture = DnatCapture("t2once", port=15006, hbone_port=15008, mark=0x200, mark_mask=0xF00, nft=nft)
    with caplog.at_level(logging.WARNING, logger="agent.capture_dnat"):
        capture.sync({"10.0.0.1"})
        capture.sync({"10.0.0.1", "10.0.0.2"})
    warnings = [r for r in caplog.records if r.getMessage() == "cannot read the DNAT capture table's counters"]
    assert len(warnings) == 1


async def test_an_nft_that_exits_as_its_timeout_fires_does_not_end_the_poller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeout's kill() meets a child that exited in between (asyncio raises ProcessLookupError once it has
    reaped it): the read is a failed one, not an exception that ends DnatCounterCollector.run for good."""

    class ExitedMeanwhile:
        returncode = None

        async def communicate(self) -> tuple[bytes, bytes]:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        def kill(self) -> None:
            self.returncode = 0
            raise ProcessLookupError

        async def wait(self) -> int:
            return 0

    async def spawn(*_args: object, **_kwargs: object) -> ExitedMeanwhile:
        return ExitedMeanwhile()

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    result = await CounterRead("ambit_t2", NoListenerCounts(), timeout=0.01).run()
    assert result is not None and "more than 0.01 s" in result
