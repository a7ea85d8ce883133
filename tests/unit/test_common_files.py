"""common/files.write_atomic: mode before content, old content kept and no temp file left when a write fails."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from common.files import write_atomic


def test_replaces_with_mode_and_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "key.pem"
    with pytest.raises(FileNotFoundError):
        write_atomic(target, b"one", 0o600)
    write_atomic(target, b"one", 0o600, parents=True)
    assert target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["key.pem"]


def test_failed_write_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.pb"
    write_atomic(target, b"good")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("common.files.os.fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"partial")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pb"]
