"""Which objects a config file's rejected documents stand for: only those keep their last good version.

With the API server every object stands on its own: a refused apply leaves that object's stored version and
changes nothing else, and a deleted object goes. A file is a set of objects declared together, so an object it
no longer offers was either deleted or is in a document that no longer validates, and only the second must keep
serving (a DENY policy must not go because of a typo). This module tells them apart, document by document:

- a rejected document whose errors name objects the file served (kind, namespace and name read, a field wrong)
  stands for those objects;
- one whose errors name none of them (YAML that does not parse, a missing or unknown kind, a name that is no name, a
  new name) stands for the previous document it most resembles, line by line, among those whose objects the file no
  longer offers (of its kind, when its kind is known: a renamed object keeps its kind; sharing at least a line): a
  typo leaves most lines as they were. Each such document holds one previous document (all of those equally close).
  A broken document that is really new thus holds back the deletion of a look-alike made in the same edit, which
  errs on the side of keeping config.

Every other object the file no longer offers goes, as the user deleted it. Unless the file looks cut short
(:func:`looks_cut_short`): then it may be a writer's half, and nothing it served goes until it holds still.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from controller.model import ObjectKey
from controller.store import error_key
from controller.validation import ParseResult


def held_objects(previous: Mapping[ObjectKey, str], result: ParseResult) -> set[ObjectKey]:
    """The objects of ``previous`` (what the file served, each with the text of its document) that ``result``'s
    rejected documents stand for. Blocking: compares documents; for a worker thread."""
    offered = {obj.key for obj in result.objects}
    gone = previous.keys() - offered
    held: set[ObjectKey] = set()
    unnamed: list[tuple[str, str | None]] = []  # (text, kind if known)
    for index, errors in result.rejected.items():
        named = {key for key in map(error_key, errors) if key is not None and key in previous}
        held |= named & gone
        if not named:
            kinds = {e.kind for e in errors if e.kind not in ("?", "List") and e.field != "kind"}
            unnamed.append((result.rejected_texts.get(index, ""), kinds.pop() if len(kinds) == 1 else None))
    candidates: dict[str, set[ObjectKey]] = {}  # a previous document's text -> its objects not accounted for
    for key in gone - held:
        candidates.setdefault(previous[key], set()).add(key)
    if unnamed and candidates:
        held |= _closest(unnamed, candidates)
    return held


def _closest(unnamed: list[tuple[str, str | None]], candidates: dict[str, set[ObjectKey]]) -> set[ObjectKey]:
    """Pairs each unnamed document with the candidate it resembles most, the closest pairs first, so that two
    broken documents do not both claim one previous document and leave the other's object to go."""
    # Stripped: a document after a `---` line starts with the rest of that line, mostly an empty one.
    lines = {text: text.strip().splitlines() for text in candidates}
    scores = []
    for text, kind in unnamed:
        own = text.strip().splitlines()
        ratios = {
            c: difflib.SequenceMatcher(None, own, theirs).ratio()
            for c, theirs in lines.items()
            if kind is None or any(key.kind == kind for key in candidates[c])
        }
        scores.append({c: r for c, r in ratios.items() if r > 0})  # not a line in common: it was not that one
    remaining = dict(candidates)
    held: set[ObjectKey] = set()
    for score in sorted(scores, key=lambda s: max(s.values(), default=0.0), reverse=True):
        live = {c: r for c, r in score.items() if c in remaining}
        if not live:
            continue  # its candidates were closer to others (or none is of its kind, or like it at all)
        best = max(live.values())
        for text, ratio in live.items():
            if ratio == best:
                held |= remaining.pop(text)
    return held


def looks_cut_short(text: str, result: ParseResult) -> bool:
    """Whether a file may be a non-atomic writer's first part: it holds no document (a shell's ``> file`` before the
    command writes), does not end its last line, or its last document is rejected (cut mid-way). Cheap signs, not
    proof either way: a cut between documents, or one that leaves a valid document, shows none of them; a file
    saved without a final newline shows one."""
    if not text.endswith("\n"):
        return True
    last = max([*result.positions.values(), *result.rejected], default=0)
    return last == 0 or last in result.rejected
