"""The last good version of each config file's objects, kept on disk so that a restarted controller still has it.

Files on disk have no admission webhook: a document can be edited into an invalid shape at any time, and the
running controller then keeps that object's last good version serving (see :mod:`controller.store`). Without a
record of it, a controller restarted meanwhile (a new pod, a node drain) would start from the invalid file alone
and push the object's removal to every agent: a DENY policy would silently go. With the Kubernetes source none of
this is needed: the API server validates and keeps the objects.

One state file per config file (named by a hash of its absolute path, so nothing in the state directory looks like
config), holding the decoded documents of every object the file served: its valid objects and the last good
versions it keeps. YAML, because decoded documents can hold values JSON cannot (timestamps). Each write replaces
the file atomically (:func:`common.files.write_atomic`): a crash leaves the old or the new record, never half.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from common.files import write_atomic
from common.log import kv

log = logging.getLogger("ambit.controller.files")

SUFFIX = ".lastgood"
FORMAT = 1

_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LastGoodError(Exception):
    """The state directory or one of its records cannot be used; str names the path and the reason."""


def default_state_dir(config_dir: str) -> str:
    """Beside the config directory, hidden: ``/x/config`` keeps its state in ``/x/.config.ambit-state``. It lives
    and goes with what it describes (the lab's copy of its config is removed with the lab), needs no privileges
    the config directory's owner lacks, and two controllers watching different directories never share it."""
    path = os.path.abspath(config_dir)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.ambit-state")


class LastGood:
    """Reads and writes the records; blocking calls, for a worker thread."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _record(self, source: str) -> Path:
        digest = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:32]
        return self.directory / f"{digest}{SUFFIX}"

    def load(self, config_dir: str) -> dict[str, list[Any]]:
        """The saved documents of every config file under ``config_dir``, by absolute path. A missing state
        directory is an empty one; a record that cannot be read is logged and skipped (it is replaced on the next
        save of its file). Raises LastGoodError when the directory exists but cannot be listed."""
        root = os.path.abspath(config_dir) + os.sep
        try:
            names = sorted(p for p in os.listdir(self.directory) if p.endswith(SUFFIX) and not p.startswith("."))
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise LastGoodError(f"{self.directory}: cannot list state directory: {e.strerror}") from e
        saved: dict[str, list[Any]] = {}
        for name in names:
            path = self.directory / name
            try:
                record = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                log.error("last good config record unreadable; skipped", extra=kv(path=str(path), error=str(e)))
                continue
            if not (
                isinstance(record, dict)
                and record.get("format") == FORMAT
                and isinstance(record.get("source"), str)
                and isinstance(record.get("documents"), list)
            ):
                log.error("last good config record malformed; skipped", extra=kv(path=str(path)))
                continue
            if record["source"].startswith(root) and path == self._record(record["source"]):
                saved[record["source"]] = record["documents"]
        return saved

    def save(self, source: str, documents: Sequence[Any]) -> None:
        """Record what ``source`` serves; no documents removes its record. Raises LastGoodError."""
        path = self._record(source)
        try:
            if not documents:
                path.unlink(missing_ok=True)
                return
            record = {"format": FORMAT, "source": os.path.abspath(source), "documents": list(documents)}
            text = yaml.dump(record, Dumper=_DUMPER, sort_keys=False, allow_unicode=True)
            write_atomic(path, text.encode(), 0o600, parents=True)
        except OSError as e:
            raise LastGoodError(f"{self.directory}: cannot save last good config: {e.strerror or e}") from e
