"""Config from a directory of YAML files (multi-document, recursive), watched for changes.

Polling (every 200 ms by default) with an (mtime_ns, size, inode, device) signature per file instead of inotify:
it needs no native code, behaves the same on every filesystem, and catches Kubernetes ConfigMap volumes, whose
updates swap a ``..data`` symlink rather than writing the files. Stat calls on a config directory cost
microseconds; reading and parsing only happen for files whose signature changed, in a worker thread so a large
file never stalls the event loop. A changed file is applied once it has held still for one interval, so a change
lands within two intervals (about 0.4 s) and a file caught mid-write is not applied unless its writer stalls for a
whole interval (atomic rename-into-place writers are always safe). If it does, a file that looks cut short
(:func:`~controller.sources.rejected.looks_cut_short`: empty, not ending its last line, its last document
rejected) applies what it holds but removes nothing it served until it has held still for ``cut_short_wait``.
Likewise a file that disappears is removed only once it has stayed away for one interval: editors that save by
renaming the old file away and writing a new one, and renames, leave a moment with no file, and its objects (a DENY
policy among them) must not go for that moment.

Each file is one source in the :class:`~controller.store.ConfigStore`; deleting the file removes its objects.
A file that cannot be read keeps its previous contribution serving; in a file with an invalid document only the
object that document was keeps its last good version (:mod:`controller.sources.rejected`), and the file's other
edits, deletions included, apply. With a state directory (:mod:`controller.sources.last_good`) what each file
serves is also saved, and a restarted controller that finds a file unreadable or invalid serves its saved objects
under the same rule. A file deleted
while the controller was down takes its saved objects with it: only a file still there, and still failing, keeps
them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.log import kv
from controller.model import KObject, ObjectKey
from controller.sources.last_good import LastGood, LastGoodError, Saved
from controller.sources.rejected import held_objects, looks_cut_short
from controller.store import ConfigStore, Contribution, SourceError, SourceResult
from controller.validation import ParseResult, parse_yaml_text

log = logging.getLogger("ambit.controller.files")

SUFFIXES = (".yaml", ".yml", ".json")

Signature = tuple[int, int, int, int]
_RETRY: Signature = (-1, -1, -1, -1)  # the "applied" signature of a file that could not be read: matches no file


class ConfigDirError(Exception):
    """The config directory itself cannot be used."""


@dataclass
class Scan:
    signatures: dict[str, Signature]
    changed: dict[str, Contribution | None]
    unlisted: dict[str, str]  # entry -> why it could not be listed or stat'ed (its known files were kept as they were)
    cut_short: set[str] = field(default_factory=set)  # changed files that look cut short


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def list_files(directory: str, unlisted: dict[str, str]) -> dict[str, Signature]:
    """Config files under ``directory`` (hidden entries skipped, symlinks followed) with their signatures.

    OSError when ``directory`` itself cannot be listed. An entry below it that cannot be listed or stat'ed
    (permissions, I/O) is recorded in ``unlisted`` with the reason; entries that vanished meanwhile are skipped."""
    found: dict[str, Signature] = {}

    def walk(path: str, depth: int) -> None:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue  # editor swap files, ConfigMap's ..data timestamped dirs (reached via the symlinks)
            try:
                if entry.is_dir() and depth < 16:
                    walk(entry.path, depth + 1)
                elif entry.is_file() and entry.name.endswith(SUFFIXES):
                    found[entry.path] = _signature(entry.stat())
            except (FileNotFoundError, NotADirectoryError) as e:
                log.debug("config entry vanished during scan", extra=kv(path=entry.path, error=str(e)))
            except OSError as e:
                unlisted[entry.path] = e.strerror or str(e)

    walk(directory, 0)
    return found


def read_file(path: str, cache: dict[str, Any] | None = None) -> tuple[Contribution, bool]:
    """Read and validate one file; ``cache`` is that file's loaded-document cache (see parse_yaml_text). Also
    whether it looks cut short (:func:`~controller.sources.rejected.looks_cut_short`)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        return SourceResult(errors=[SourceError(path, f"not UTF-8 text: {e.reason} at byte {e.start}")]), False
    except OSError as e:
        return SourceResult(errors=[SourceError(path, f"cannot read: {e.strerror}")]), False
    result = parse_yaml_text(path, text, cache)
    return result, looks_cut_short(text, result)


def scan(
    directory: str,
    known: Mapping[str, Signature],
    previous: Mapping[str, Signature] | None = None,
    caches: dict[str, dict[str, Any]] | None = None,
) -> Scan:
    """Blocking: one pass over the directory; parses new and changed files, reports removed ones as None.

    With ``previous`` (the signatures of the last pass) a changed file is read only once its signature has held
    still for a whole interval, and only if it did not change while being read: a file caught half-written
    (truncated by a non-atomic writer) would otherwise take its objects away for a moment. Likewise a file is
    reported removed only once it was already missing in the last pass.
    """
    unlisted: dict[str, str] = {}
    try:
        current = list_files(directory, unlisted)
    except OSError as e:
        raise ConfigDirError(f"{directory}: cannot list config directory: {e.strerror}") from e
    # What could not be listed is not gone: known files under it stay as they were (their objects keep serving)
    # until it can be listed again. A subdirectory that never held config (lost+found) costs nothing.
    for path, sig in known.items():
        if path not in current and any(path == d or path.startswith(d + os.sep) for d in unlisted):
            current[path] = sig
    # Removals first: a file renamed in the same pass then hands its objects over without ever being claimed by
    # both names (which the store would log as a duplicate).
    changed: dict[str, Contribution | None] = {}
    cut_short: set[str] = set()
    for path in known.keys() - current.keys():
        # A file that vanished since the last pass may be an editor saving by renaming the old one away: it is
        # removed once it has stayed away for a whole pass, so its objects never go for a moment.
        if previous is None or path not in previous:
            changed[path] = None
    for path, sig in current.items():
        if known.get(path) == sig or (previous is not None and previous.get(path) != sig):
            continue
        contribution, cut = read_file(path, caches.setdefault(path, {}) if caches is not None else None)
        try:
            if _signature(os.stat(path)) != sig:
                continue  # written to while we read it: next pass
        except OSError:
            continue  # removed while we read it: next pass reports the removal
        changed[path] = contribution
        if cut:
            cut_short.add(path)
    if caches is not None:
        for path in caches.keys() - current.keys():
            del caches[path]
    return Scan(current, changed, unlisted, cut_short)


class FileSource:
    """Keeps the store in step with a directory; :meth:`initial_sync` once, then :meth:`run` to follow changes."""

    def __init__(
        self,
        directory: str,
        store: ConfigStore,
        poll_interval: float = 0.2,
        state_dir: str | None = None,
        cut_short_wait: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Absolute, so a file's saved record is found again whatever working directory the next run starts in.
        self.directory = os.path.abspath(directory)
        self.store = store
        self.poll_interval = poll_interval
        self._last_good = LastGood(state_dir) if state_dir else None
        self._loaded = False  # the saved records were read (on the first pass that could list the directory)
        self._saved: dict[str, Saved] = {}  # records of files not read since start
        self._served: dict[str, Saved] = {}  # what each file serves, with each object's document
        self._state_error: str | None = None
        self._known: dict[str, Signature] = {}  # signature of each file's applied content
        self._previous: dict[str, Signature] = {}  # signatures seen by the last pass
        # Per file, its documents as loaded last time: an edit re-loads only the documents it touched.
        # Used only by the one scan thread running at a time.
        self._doc_caches: dict[str, dict[str, Any]] = {}
        self._dir_error: str | None = None
        self._failing: dict[str, list[str]] = {}  # errors of each file being retried, as last applied
        self._unlisted: dict[str, str] = {}  # entries that could not be listed or stat'ed on the last pass
        self.cut_short_wait = cut_short_wait
        self._clock = clock
        # Files applied while they looked cut short, keeping everything they served: when, held still, what they
        # no longer hold goes, and their contribution as applied.
        self._cut_short: dict[str, tuple[float, ParseResult]] = {}

    async def initial_sync(self, max_passes: int = 25) -> None:
        """The first state to serve: everything read, then passes until every file held still for an interval.

        Nothing is served yet, so a file caught half-written (a non-atomic writer at work during the start) costs
        nothing if the pass that sees it change again runs before xDS opens; served, the half would take the
        objects it lacks away from every agent. A file modified less than an interval before it was read gets that
        second look too. A directory that never holds still is served as last read after ``max_passes``. Raises
        ConfigDirError."""
        await self.sync()
        for passes in range(max_passes + 1):
            unsettled = self._unsettled(time.time_ns() - int(self.poll_interval * 1e9))
            if not unsettled:
                return
            if passes == max_passes:
                log.warning(
                    "config files kept changing during start; serving them as last read", extra=kv(files=unsettled)
                )
                return
            if not passes:
                log.info("config files still changing; waiting for them before serving", extra=kv(files=unsettled))
            await asyncio.sleep(self.poll_interval)
            await self.sync(settle=True)

    def _unsettled(self, recent_ns: int) -> list[str]:
        """Files whose applied content may not be their last: changed, missing or new since it was read, or modified
        after ``recent_ns``. An unreadable file is retried every pass anyway: nothing to wait for."""
        out = [
            p
            for p, sig in self._known.items()
            if sig != _RETRY and (self._previous.get(p) != sig or sig[0] > recent_ns)
        ]
        return out + sorted(self._previous.keys() - self._known.keys())

    async def sync(self, settle: bool = False) -> int:
        """Scan once and apply what changed; returns the number of files applied. Raises ConfigDirError.

        ``settle`` applies a changed file only once it held still since the previous pass (what :meth:`run` does).
        """
        previous = dict(self._previous) if settle else None
        result = await asyncio.to_thread(scan, self.directory, dict(self._known), previous, self._doc_caches)
        self._previous = result.signatures
        self._report_unlisted(result.unlisted)
        known: dict[str, Signature] = {}
        for path, sig in result.signatures.items():
            if path in result.changed:
                # An unreadable file is retried every pass (no signature matches _RETRY), and is still known: the
                # store holds its contribution, which its deletion must take away.
                known[path] = _RETRY if _unreadable(result.changed[path]) else sig
            elif path in self._known:
                known[path] = self._known[path]  # unchanged, or changed but not settled yet
        for path, sig in self._known.items():
            if path not in result.signatures and path not in result.changed:
                known[path] = sig  # missing for the first time: its removal is reported next pass
        self._known = known
        restored = await self._restore(result)
        changed = {path: c for path, c in result.changed.items() if not self._same_failure(path, c)}
        held: dict[str, set[ObjectKey]] = {}
        for path, contribution in changed.items():
            self._cut_short.pop(path, None)
            if not isinstance(contribution, ParseResult):
                continue  # removed, or unreadable: an unreadable file keeps all it served
            keys = [obj.key for obj in restored[path]] if path in restored else list(self.store.offered(path))
            served = self._served.get(path, {})
            documents = {key: served.get(str(key), "") for key in keys}
            if path in result.cut_short and documents.keys() - {obj.key for obj in contribution.objects}:
                held[path] = set(documents)
                self._cut_short[path] = (self._clock() + self.cut_short_wait, contribution)
                log.warning(
                    "config file looks cut short (no document, no final newline or its last document invalid);"
                    " the objects it no longer holds stay until it holds still",
                    extra=kv(file=path, wait_seconds=self.cut_short_wait),
                )
            elif contribution.errors:
                held[path] = await asyncio.to_thread(held_objects, documents, contribution)
        if restored:
            # As if the last good versions had been read before the bad edit.
            self.store.update(self._restored(restored, result.changed, held))
        if changed:
            for path, contribution in changed.items():
                log.info(
                    "config file removed" if contribution is None else "config file loaded",
                    extra=kv(
                        file=path,
                        objects=len(contribution.objects) if contribution else 0,
                        errors=len(contribution.errors) if contribution else 0,
                    ),
                )
            self.store.update(changed, held)
            await self._save(changed)
        return len(changed) + await self._settle_cut_short()

    async def _settle_cut_short(self) -> int:
        """Applies in full each file that looked cut short and has held still, as read, for ``cut_short_wait``: what
        it no longer holds (but its rejected documents' objects) goes now. Returns the number of files applied."""
        now = self._clock()
        due: dict[str, Contribution | None] = {}
        held: dict[str, set[ObjectKey]] = {}
        for path, (deadline, contribution) in list(self._cut_short.items()):
            if deadline > now or self._previous.get(path) != self._known.get(path):
                continue  # waiting, or being written to again: its next read replaces this
            del self._cut_short[path]
            served = self._served.get(path, {})
            documents = {key: served.get(str(key), "") for key in self.store.offered(path)}
            held[path] = await asyncio.to_thread(held_objects, documents, contribution)
            due[path] = contribution
            log.info("config file held still; what it no longer holds is removed", extra=kv(file=path))
        if due:
            self.store.update(due, held)
            await self._save(due)
        return len(due)

    async def _restore(self, result: Scan) -> dict[str, list[KObject]]:
        """The saved objects of each file read for the first time since start that is unreadable, invalid or looks
        cut short (:meth:`_restored` keeps those the file still holds).

        On the first pass, the records of files no longer there are deleted: those files were removed on purpose.
        A file under an entry that cannot be listed is not known to be gone: its saved objects are restored, and
        the file counts as unreadable (added to ``result.changed``) until the entry can be listed again."""
        if self._last_good is None:
            return {}
        if not self._loaded:
            try:
                self._saved = await asyncio.to_thread(self._last_good.load, self.directory)
            except LastGoodError as e:
                self._state_failed(e)
            self._loaded = True
            for path in sorted(p for p in self._saved if p not in result.signatures):
                entry = next((e for e in result.unlisted if path.startswith(e + os.sep)), None)
                if entry is None:
                    del self._saved[path]
                    log.info("config file gone since the last run; its saved objects are dropped", extra=kv(file=path))
                    await self._write(path, {})
                else:
                    reason = f"cannot list {entry}: {result.unlisted[entry]}"
                    result.changed[path] = SourceResult(errors=[SourceError(path, reason)])
                    self._known[path] = _RETRY
        restored: dict[str, list[KObject]] = {}
        for path, contribution in result.changed.items():
            saved = self._saved.pop(path, None)
            if saved is None:
                continue
            self._served[path] = saved  # what _save compares with: a file read as it was recorded is not rewritten
            if contribution is None or not (contribution.errors or path in result.cut_short):
                continue
            objects, lost = await asyncio.to_thread(_restore_objects, path, saved)
            if lost:
                log.error("saved last good objects no longer valid; not restored", extra=kv(file=path, objects=lost))
            restored[path] = objects
        return restored

    def _restored(
        self,
        restored: Mapping[str, list[KObject]],
        changed: Mapping[str, Contribution | None],
        held: Mapping[str, set[ObjectKey]],
    ) -> dict[str, Contribution]:
        """Of each file's saved objects, those it keeps (see :meth:`sync`): all of them for an unreadable file."""
        out: dict[str, Contribution] = {}
        for path, objects in restored.items():
            keep = held.get(path)
            kept = [obj for obj in objects if keep is None or obj.key in keep]
            contribution = changed[path]
            log.warning(
                "config file failing or cut short at start; serving its last good objects from the state directory",
                extra=kv(
                    file=path,
                    objects=len(kept),
                    errors=[str(e) for e in contribution.errors] if contribution else [],
                    state_dir=str(self._last_good.directory) if self._last_good else "",
                ),
            )
            out[path] = ParseResult(objects=kept)
        return out

    async def _save(self, changed: Mapping[str, Contribution | None]) -> None:
        """Record what each changed file now serves, its valid objects and the last good versions it keeps, each as
        the text of its document: the next bad edit is compared with these (:mod:`controller.sources.rejected`),
        and with a state directory they are saved for a restart."""
        for path, contribution in changed.items():
            before = self._served.pop(path, {})
            served: Saved = {}
            if contribution is not None:
                fresh = contribution.texts if isinstance(contribution, ParseResult) else {}
                for key in self.store.offered(path):
                    text = fresh.get(key) or before.get(str(key))
                    if text is not None:
                        served[str(key)] = text
                self._served[path] = served
            if self._last_good is not None and served != before:
                await self._write(path, served)

    async def _write(self, path: str, served: Saved) -> None:
        assert self._last_good is not None
        try:
            await asyncio.to_thread(self._last_good.save, path, served)
        except LastGoodError as e:
            self._state_failed(e)
            return
        if self._state_error is not None:
            log.info("state directory writable again", extra=kv(state_dir=str(self._last_good.directory)))
            self._state_error = None

    def _state_failed(self, error: LastGoodError) -> None:
        """Logged once per new reason: config keeps serving, only a restart's memory of it is at risk."""
        if str(error) != self._state_error:
            log.error(
                "cannot keep the last good config in the state directory; a restart would forget it",
                extra=kv(error=str(error)),
            )
            self._state_error = str(error)

    def _report_unlisted(self, unlisted: dict[str, str]) -> None:
        for path, reason in unlisted.items():
            if self._unlisted.get(path) != reason:
                log.error(
                    "config entry cannot be listed; its files keep serving as they were",
                    extra=kv(path=path, error=reason),
                )
        for path in self._unlisted.keys() - unlisted.keys():
            log.info("config entry listed again", extra=kv(path=path))
        self._unlisted = unlisted

    def _same_failure(self, path: str, contribution: Contribution | None) -> bool:
        """Whether ``path`` is still unreadable for the same reason as on the last pass: nothing new to apply or log."""
        if contribution is None or not _unreadable(contribution):
            self._failing.pop(path, None)
            return False
        errors = [str(e) for e in contribution.errors]
        same = self._failing.get(path) == errors
        self._failing[path] = errors
        return same

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.sync(settle=True)
                if self._dir_error is not None:
                    log.info("config directory readable again", extra=kv(directory=self.directory))
                    self._dir_error = None
            except ConfigDirError as e:
                if str(e) != self._dir_error:
                    log.error("config directory unreadable; keeping the current config", extra=kv(error=str(e)))
                    self._dir_error = str(e)
            except Exception:  # a bug downstream must not stop the watch: later edits can still apply
                log.exception("applying config changes failed", extra=kv(directory=self.directory))


def _restore_objects(path: str, saved: Saved) -> tuple[list[KObject], list[str]]:
    """Blocking: the objects of a record, and the keys of those that no longer validate (a newer controller may
    refuse what an older one accepted). Each document is parsed on its own: a List document recorded for one
    of its items may hold others the file no longer served."""
    wanted: dict[str, set[str]] = {}
    for key, text in saved.items():
        wanted.setdefault(text, set()).add(key)
    objects: list[KObject] = []
    for text, keys in wanted.items():
        objects.extend(obj for obj in parse_yaml_text(path, text).objects if str(obj.key) in keys)
    lost = sorted(saved.keys() - {str(obj.key) for obj in objects})
    return objects, lost


def _unreadable(contribution: Contribution | None) -> bool:
    return contribution is not None and any(isinstance(e, SourceError) for e in contribution.errors)
