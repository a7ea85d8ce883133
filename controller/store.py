"""The controller's config store: which source contributes which objects, and what is serving right now.

Sources (files, Kubernetes resources) hand over their whole contribution each time they change; the store works out
upserts and deletes for the translator. One rule keeps a bad edit from taking config away: an object that fails
validation keeps its last valid version serving, as an object the API server refuses keeps its stored one. Which
objects those are is the source's to tell (``held`` in :meth:`ConfigStore.update`): the file source works out which
object each rejected document was (:mod:`controller.sources.rejected`), and everything else the file no longer
offers goes, as with ``kubectl apply``, where every object stands on its own (unless the file looks cut short by a
writer: then it holds everything for a while). A source with errors that cannot tell (a file that cannot be read at
all) removes nothing it contributed before until it is clean again. The file source applies the same rule at
start-up to the last good versions it saved, so a restart does not forget them either.

The same object defined by two sources is an error on the later one; the first keeps serving, and the second
takes over only if the first withdraws it.

A change of thousands of sources (every pod of a large cluster, listed again after a watch expired) costs the
translator about 0.2 ms per new pod, seconds in all, which :meth:`ConfigStore.update` would spend in one go on the
event loop that also serves xDS, the CA and the readiness probe. :meth:`ConfigStore.update_in_steps` applies it a few
sources at a time and lets the loop run between steps; what the listeners (the xDS server, hence the agents) see stays
whole: they get the merged delta of the steps, and of any other update made meanwhile, once, when the last step is
in. The translator itself does move step by step; upserts go first and removals last, so in between it holds the
union of what was and what will be (the CA's node authorization never misses a pod that exists).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.log import kv
from controller.model import KObject, ObjectKey
from controller.monitoring import ControllerMetrics
from controller.translate import Delta, Translator
from controller.validation import ConfigError

log = logging.getLogger("ambit.controller.config")

# update_in_steps: sources per step, and the loop time a run of steps may take before it yields (a few ms: the loop
# serves xDS and the CA meanwhile). A step of new pods costs about 0.2 ms each.
STEP_SOURCES = 8
STEP_SECONDS = 0.002


class SourceError(Exception):
    """A whole source failed (unreadable file, bad encoding, API error); str is ``<source>: <reason>``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


Problem = ConfigError | SourceError


class Contribution(Protocol):
    """What a source hands over: validation's ParseResult has this shape."""

    @property
    def objects(self) -> Sequence[KObject]: ...

    @property
    def errors(self) -> Sequence[Problem]: ...


@dataclass
class SourceResult:
    objects: Sequence[KObject] = ()
    errors: Sequence[Problem] = ()


def error_key(err: Problem) -> ObjectKey | None:
    """The object an error belongs to, or None when validation could not tell (no kind or name, an unknown kind)."""
    if isinstance(err, SourceError) or err.kind == "?" or err.name.startswith("#") or err.field == "kind":
        return None
    return ObjectKey(err.kind, err.namespace, err.name)


@dataclass
class _SourceState:
    objects: dict[ObjectKey, KObject]
    errors: list[Problem]
    kept: set[ObjectKey] = field(default_factory=set)  # serving a previous version despite an error


def _merge_delta(into: Delta, delta: Delta) -> None:
    """``delta`` after ``into``: the later value of a resource wins (None: removed)."""
    into.addresses.update(delta.addresses)
    into.authorizations.update(delta.authorizations)


def source_kind(source_id: str) -> str:
    return "kube" if source_id.startswith("kube:") else "file"


class ConfigStore:
    """Feeds the translator from many sources; call from the event loop only."""

    def __init__(self, translator: Translator, metrics: ControllerMetrics | None = None) -> None:
        self.translator = translator
        self.metrics = metrics or ControllerMetrics()
        self._sources: dict[str, _SourceState] = {}
        self._claims: dict[ObjectKey, list[str]] = {}  # sources offering each key; the first one serves
        self._listeners: list[Callable[[Delta], None]] = []
        self._warned: dict[ObjectKey, str] = {}  # translator warnings already logged
        self.generation = 0
        self._steps = 0  # update_in_steps calls under way: listeners are told when the last one ends
        # Kept as sources change, for the gauges: counting them over every source and claim at each update cost 3 ms
        # per watch event with 10,000 pods.
        self._error_count = 0  # errors of every source
        self._duplicate_count = 0  # claims beyond the first, over every key
        self._held = Delta()  # what changed meanwhile, for the listeners then

    def subscribe(self, listener: Callable[[Delta], None]) -> None:
        self._listeners.append(listener)

    def update(
        self, changes: Mapping[str, Contribution | None], held: Mapping[str, Collection[ObjectKey]] | None = None
    ) -> Delta:
        """Replace the contribution of each named source (None: the source is gone) and apply the difference.

        ``held`` names, for a source, the objects it offered before that keep the version they had though it no
        longer offers them (those its errors stand for; everything, while a file looks cut short); what else it no
        longer offers goes. A source with errors not named there keeps everything it offered before.

        While :meth:`update_in_steps` is under way, the delta goes to the listeners with its, when it ends."""
        try:
            delta = self._apply(changes, held)
        finally:
            self._update_gauges()
        if delta is None:
            return Delta()
        self.generation += 1
        self._log_warnings()
        self._publish(delta)
        return delta

    async def update_in_steps(
        self,
        changes: Mapping[str, Contribution | None],
        step: int = STEP_SOURCES,
        budget: float = STEP_SECONDS,
    ) -> Delta:
        """:meth:`update` of many sources without holding the event loop for long: ``step`` sources at a time,
        yielding to the loop whenever a run of steps has taken ``budget`` seconds (0: after every step).

        The listeners get one delta when it is done (cancelled or failed too: the translator has moved): the merged
        changes of every step and of every :meth:`update` made meanwhile, never a state in between. Upserts are
        applied before removals, so the translator in between holds the union of the old and the new state. An
        object handed from one source to another in ``changes`` is, in between, offered by both (the first claim
        serves; a duplicate is logged): use :meth:`update` for such a change. Callers keep the order of their own
        updates: one made to a source of ``changes`` meanwhile may be overwritten by a later step."""
        ordered = [item for item in changes.items() if item[1] is not None]
        ordered += [item for item in changes.items() if item[1] is None]  # upserts, then removals
        merged = Delta()
        changed = False
        self._steps += 1
        try:
            since = time.monotonic()
            for start in range(0, len(ordered), max(1, step)):
                delta = self._apply(dict(ordered[start : start + max(1, step)]), None)
                if delta is not None:
                    changed = True
                    _merge_delta(merged, delta)
                    self._publish(delta)
                if time.monotonic() - since >= budget:
                    await asyncio.sleep(0)
                    since = time.monotonic()
        finally:
            self._steps -= 1
            self._update_gauges()
            if changed:
                self.generation += 1
                self._log_warnings()
            if not self._steps:
                held, self._held = self._held, Delta()
                self._publish(held)
        return merged

    def _publish(self, delta: Delta) -> None:
        """Tell the listeners, or keep it for them while update_in_steps is under way."""
        if self._steps:
            _merge_delta(self._held, delta)
            return
        if delta:
            for listener in self._listeners:
                listener(delta)

    def _apply(
        self, changes: Mapping[str, Contribution | None], held: Mapping[str, Collection[ObjectKey]] | None
    ) -> Delta | None:
        """Move the sources and the translator to ``changes``; the translator's delta, None if nothing served
        changed (the translator was not called)."""
        before: dict[ObjectKey, KObject | None] = {}
        states: dict[str, tuple[Mapping[ObjectKey, KObject], set[str], _SourceState]] = {}
        for source_id, result in changes.items():
            old = self._sources.get(source_id)
            old_objects: Mapping[ObjectKey, KObject] = old.objects if old is not None else {}
            old_errors = set(map(str, old.errors)) if old is not None else set()
            keep = held.get(source_id) if held is not None else None
            new = _SourceState({}, []) if result is None else self._merge(old_objects, result, keep)
            states[source_id] = (old_objects, old_errors, new)
            for key in old_objects.keys() | new.objects.keys():
                if key not in before:
                    before[key] = self._serving(key)
        # Every withdrawal of the batch before any new claim: an object moving from one source to another in one
        # update (a ConfigMap key renamed, a document moved between files) is handed over, not a duplicate.
        for source_id, (old_objects, old_errors, new) in states.items():
            for key in old_objects.keys() - new.objects.keys():
                claims = self._claims[key]
                if len(claims) > 1:
                    self._duplicate_count -= 1
                claims.remove(source_id)
                if not claims:
                    del self._claims[key]
            old_state = self._sources.get(source_id)
            self._error_count += len(new.errors) - (len(old_state.errors) if old_state is not None else 0)
            if changes[source_id] is None:
                self._sources.pop(source_id, None)
            else:
                self._sources[source_id] = new
            self._log_errors(source_id, old_errors, new)
        for source_id, (old_objects, _, new) in states.items():
            for key in new.objects.keys() - old_objects.keys():
                claims = self._claims.setdefault(key, [])
                claims.append(source_id)
                if len(claims) > 1:
                    self._duplicate_count += 1
                    log.warning(
                        "duplicate config object ignored",
                        extra=kv(object=str(key), source=source_id, serving_from=claims[0]),
                    )
        upserts: list[KObject] = []
        deletes: list[ObjectKey] = []
        for key, was in before.items():
            now = self._serving(key)
            if now is None:
                if was is not None:
                    deletes.append(key)
            elif now is not was:
                upserts.append(now)
        if not upserts and not deletes:
            return None
        return self.translator.apply(upserts, deletes)

    def _merge(
        self, old_objects: Mapping[ObjectKey, KObject], result: Contribution, held: Collection[ObjectKey] | None
    ) -> _SourceState:
        objects = {obj.key: obj for obj in result.objects}
        errors = list(result.errors)
        kept: set[ObjectKey] = set()
        if errors or held is not None:
            for key, obj in old_objects.items():
                if key not in objects and (held is None or key in held):
                    objects[key] = obj
                    kept.add(key)
        return _SourceState(objects, errors, kept)

    def _serving(self, key: ObjectKey) -> KObject | None:
        claims = self._claims.get(key)
        return self._sources[claims[0]].objects[key] if claims else None

    def _log_errors(self, source_id: str, old_errors: set[str], new: _SourceState) -> None:
        new_errors = {str(e): e for e in new.errors}
        for text, err in new_errors.items():
            if text in old_errors:
                continue
            self.metrics.config_errors_total.labels(source_kind(source_id)).inc()
            key = error_key(err)
            kept = key in new.kept if key is not None else bool(new.kept)
            log.warning(
                "config rejected",
                extra=kv(source=source_id, object=str(key) if key else "", error=text, last_valid_serving=kept),
            )
        for text in old_errors - new_errors.keys():
            log.info("config error resolved", extra=kv(source=source_id, error=text))

    def _log_warnings(self) -> None:
        """Objects accepted with a caveat (an action the agent cannot enforce, HTTP rules without a waypoint, a DENY
        without rules, ...) are logged once when the caveat appears or changes, not only shown in config_status:
        the policy then does less, or more, than its author wrote."""
        warnings = self.translator.warnings
        for key, warning in warnings.items():
            if self._warned.get(key) != warning:
                log.warning("config accepted with a caveat", extra=kv(object=str(key), warning=warning))
        self._warned = warnings

    def _duplicates(self) -> list[tuple[ObjectKey, str, str]]:
        """(key, ignored source, serving source) for every object defined more than once."""
        return [(key, sid, claims[0]) for key, claims in self._claims.items() for sid in claims[1:]]

    def _update_gauges(self) -> None:
        self.metrics.config_errors.set(self._error_count + self._duplicate_count)
        self.metrics.config_objects.set(len(self._claims))

    # ---- introspection -------------------------------------------------------------------------------------------

    def errors(self) -> list[str]:
        """Every current problem as its user-facing text, duplicates included."""
        out = [str(e) for s in self._sources.values() for e in s.errors]
        out.extend(
            f"{sid}:{key}: metadata.name: duplicate of the object in {first}" for key, sid, first in self._duplicates()
        )
        return out

    def status(self) -> dict[str, Any]:
        """For /debug/config_status: each object's state and every error."""
        objects: dict[str, dict[str, Any]] = {}
        for key, claims in self._claims.items():
            state = self._sources[claims[0]]
            objects[str(key)] = {"source": claims[0], "status": "valid"}
            if key in state.kept:
                objects[str(key)]["status"] = "rejected"
                objects[str(key)]["serving"] = "last valid version"
        for sid, state in self._sources.items():
            for err in state.errors:
                err_key = error_key(err)
                if err_key is None:
                    continue
                entry = objects.setdefault(str(err_key), {"source": sid, "status": "rejected", "serving": "nothing"})
                entry.setdefault("errors", []).append(str(err))
            for key in state.kept:
                if "errors" not in objects[str(key)]:
                    # No error names it: its document no longer names any object, or the source failed as a whole.
                    objects[str(key)]["status"] = "stale"
        for key, sid, first in self._duplicates():
            objects[str(key)].setdefault("errors", []).append(f"{sid}: duplicate of the object in {first}")
        warnings = self.translator.warnings
        for key, warning in warnings.items():
            if str(key) in objects:
                objects[str(key)]["warning"] = warning
        return {
            "generation": self.generation,
            "sources": {
                sid: {"objects": len(s.objects), "errors": [str(e) for e in s.errors]}
                for sid, s in sorted(self._sources.items())
            },
            "errors": self.errors(),
            "objects": dict(sorted(objects.items())),
        }

    def sources(self) -> list[str]:
        return sorted(self._sources)

    def offered(self, source_id: str) -> Mapping[ObjectKey, KObject]:
        """What a source offers now: its valid objects and the last valid versions it keeps (served unless another
        source claimed the object first)."""
        state = self._sources.get(source_id)
        return state.objects if state is not None else {}
