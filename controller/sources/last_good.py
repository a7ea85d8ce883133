"""The last good version of each config file's objects, kept on disk so that a restarted controller still has it.

Files on disk have no admission webhook: a document can be edited into an invalid shape at any time, and the
running controller then keeps that object's last good version serving (see :mod:`controller.store`). Without a
record of it, a controller restarted meanwhile (a new pod, a node drain) would start from the invalid file alone
and push the object's removal to every agent: a DENY policy would silently go. With the Kubernetes source none of
this is needed: the API server validates and keeps the objects.

One record per config file (named by a hash of its absolute path, so nothing in the state directory looks like
config): the text of each document whose object the file served, its valid objects and the last good versions it
keeps, as written in the file. Kept as text, not re-serialised: saving costs a copy of strings the source already
holds, and restoring parses exactly what was once accepted. Each write replaces the record atomically
(:func:`common.files.write_atomic`): a crash leaves the old or the new record, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from common.files import write_atomic
from common.log import kv

log = logging.getLogger("ambit.controller.files")

SUFFIX = ".lastgood"
FORMAT = 1

Saved = dict[str, str]  # "Kind/namespace/name" -> the text of the document it came from


class LastGoodError(Exception):
    """The state directory or one of its records cannot be used; str names the path and the reason."""


def default_state_dir(config_dir: str) -> str:
    """Beside the config directory, hidden: ``/x/config`` keeps its state in ``/x/.config.ambit-state``. It lives
    and goes with what it describes (the lab's copy of its config is removed with the lab, and this with it), and
    two controllers watching different directories never share it. Where the parent is read-only (a ConfigMap
    volume's mount point) saving fails, is logged, and ``--state-dir`` names a writable place."""
    path = os.path.abspath(config_dir)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.ambit-state")


class LastGood:
    """Reads and writes the records; blocking calls, for a worker thread."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _record(self, source: str) -> Path:
        digest = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:32]
        return self.directory / f"{digest}{SUFFIX}"

    def load(self, config_dir: str) -> dict[str, Saved]:
        """The saved objects of every config file under ``config_dir``, by absolute path. A missing state
        directory is an empty one; a record that cannot be read is logged and skipped (it is replaced on the next
        save of its file). Raises LastGoodError when the directory exists but cannot be listed."""
        root = os.path.abspath(config_dir) + os.sep
        try:
            names = sorted(p for p in os.listdir(self.directory) if p.endswith(SUFFIX) and not p.startswith("."))
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise LastGoodError(f"{self.directory}: cannot list state directory: {e.strerror}") from e
        saved: dict[str, Saved] = {}
        for name in names:
            path = self.directory / name
            try:
                source, entry = _parse_record(path.read_bytes())
            except (OSError, ValueError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
                log.error("last good config record unreadable; skipped", extra=kv(path=str(path), error=str(e)))
                continue
            if source.startswith(root) and path == self._record(source):
                saved[source] = entry
        return saved

    def save(self, source: str, objects: Mapping[str, str]) -> None:
        """Record what ``source`` serves (see :data:`Saved`); nothing removes its record. Raises LastGoodError."""
        path = self._record(source)
        texts: dict[str, int] = {}  # a List document serving several objects is written once
        positions = {key: texts.setdefault(text, len(texts)) for key, text in objects.items()}
        record = {"format": FORMAT, "source": os.path.abspath(source), "objects": positions, "documents": list(texts)}
        try:
            if not objects:
                path.unlink(missing_ok=True)
                return
            write_atomic(path, json.dumps(record, ensure_ascii=False).encode(), 0o600, parents=True)
        except OSError as e:
            raise LastGoodError(f"{self.directory}: cannot save last good config: {e.strerror or e}") from e


def _parse_record(data: bytes) -> tuple[str, Saved]:
    record = json.loads(data)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"not a format {FORMAT} record")
    source, texts, positions = record.get("source"), record.get("documents"), record.get("objects")
    if not (isinstance(source, str) and isinstance(texts, list) and isinstance(positions, dict)):
        raise ValueError("source, documents or objects missing")
    if not all(isinstance(i, int) and 0 <= i < len(texts) and isinstance(texts[i], str) for i in positions.values()):
        raise ValueError("an object names no document")
    return source, {str(key): texts[i] for key, i in positions.items()}
