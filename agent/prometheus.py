"""The agent's Prometheus registry and its two exposition formats (text 0.0.4 and OpenMetrics 1.0.0).

Why not prometheus_client: importing it loads its own exporters' dependencies (http.server, urllib.request, wsgiref,
email), which the agent never uses since it serves /metrics from its own server. Measured with the rest of the
agent imported: 3.1 MB of RSS on every node, 5% of the agent's footprint with 100 local workloads. The agent needs
only counters and gauges with labels, collectors rendered at scrape time and the two formats a scraper asks for,
which is this module. The tests parse its output with prometheus_client's own parsers (a dev dependency), so the
format is checked against the reference implementation.

Everything runs on the event loop's thread: no locks.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class MetricFamily:
    """One metric family as a scrape sees it. A counter's ``name`` is without ``_total``; its samples carry it.

    Rows are kept as (label values, value), in ``labelnames`` order: a scrape renders them without a dict per
    sample; ``samples`` builds the named view for tests and tools."""

    name: str
    documentation: str
    type: str  # "counter" or "gauge"
    labelnames: tuple[str, ...] = ()
    rows: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    @property
    def sample_name(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    @property
    def samples(self) -> list[Sample]:
        name, names = self.sample_name, self.labelnames
        return [Sample(name, dict(zip(names, values, strict=True)), value) for values, value in self.rows]

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(labels)} label values for {len(self.labelnames)} label names")
        self.rows.append((tuple(labels), value))


def _family(
    kind: str, name: str, documentation: str, value: float | None, labels: Sequence[str] | None
) -> MetricFamily:
    if kind == "counter" and name.endswith("_total"):
        name = name[: -len("_total")]
    fam = MetricFamily(name, documentation, kind, tuple(labels or ()))
    if value is not None:
        if labels:
            raise ValueError(f"{name}: a value is given for a family with labels")
        fam.add_metric((), value)
    return fam


def counter_family(
    name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None
) -> MetricFamily:
    return _family("counter", name, documentation, value, labels)


def gauge_family(
    name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None
) -> MetricFamily:
    return _family("gauge", name, documentation, value, labels)


class Collector(Protocol):
    def collect(self) -> Iterable[MetricFamily]: ...


class Registry:
    """The collectors one /metrics scrape renders, in registration order."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()

    def register(self, collector: Collector) -> None:
        name = getattr(collector, "name", None)
        if isinstance(name, str):
            if name in self._names:
                raise ValueError(f"duplicate metric {name!r} in one registry")
            self._names.add(name)
        self._collectors.append(collector)

    def collect(self) -> Iterator[MetricFamily]:
        for collector in list(self._collectors):
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of the sample with exactly this name and these labels, or None (for tests and tools)."""
        want = labels or {}
        for fam in self.collect():
            for s in fam.samples:
                if s.name == name and s.labels == want:
                    return s.value
        return None


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _CounterChild(_Child):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class _GaugeChild(_Child):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)


C = TypeVar("C", bound=_Child)


class _Metric(Generic[C]):
    """A family whose series the agent updates as things happen (for the hot path's counters, see metrics.py)."""

    kind = ""
    child_type: type[C]

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), registry: Registry | None = None
    ) -> None:
        self.name = name[: -len("_total")] if self.kind == "counter" and name.endswith("_total") else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        if not self.labelnames:
            self._children[()] = self.child_type()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values for {self.labelnames}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.child_type()
        return child

    @property
    def children(self) -> dict[tuple[str, ...], C]:
        """The series by their label values (agent.metrics_expiry removes those of workloads gone)."""
        return self._children

    def remove(self, *values: str) -> None:
        self._children.pop(tuple(str(v) for v in values), None)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def collect(self) -> Iterator[MetricFamily]:
        fam = _family(self.kind, self.name, self.documentation, None, self.labelnames)
        for key, child in list(self._children.items()):
            fam.add_metric(key, child.value)
        yield fam


class Counter(_Metric[_CounterChild]):
    kind = "counter"
    child_type = _CounterChild


class Gauge(_Metric[_GaugeChild]):
    kind = "gauge"
    child_type = _GaugeChild


# ---------------------------------------------------------------------------------------------------- exposition


def wants_openmetrics(accept: str) -> bool:
    """Prometheus lists OpenMetrics first (highest q) when it can parse it; anything else gets the 0.0.4 text. As
    ztunnel's stats server (src/metrics/server.rs content_type), OpenMetrics is served whenever it is listed, the
    weights aside, except with q=0, which says it is not acceptable (RFC 9110 12.4.2). Media types and parameter
    names are case-insensitive, so matched lowercased."""
    for part in accept.lower().split(","):
        media, _, params = part.partition(";")
        if media.strip() == "application/openmetrics-text" and _quality(params) > 0:
            return True
    return False


def _quality(params: str) -> float:
    """The q of a header element's ``;``-separated parameters (1 when none; 0 when it does not parse)."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def render(registry: Registry, accept: str = "") -> tuple[bytes, str]:
    """The scrape body and its content type, in the format ``accept`` asks for."""
    openmetrics = wants_openmetrics(accept)
    body = "".join(_Exposition(openmetrics).pieces(registry))
    return body.encode(), OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE


GZIP_LEVEL = 1
"""zlib's fastest level. A 20,000-series scrape (14 MB of text, Istio's 27 labels) gzips to 190 KB at level 1 and
185 KB at level 6, for a third of the CPU (about 35 against 95 ms here); prometheus_client compresses at 9."""


def gzip_accepted(accept_encoding: str) -> bool:
    """Whether the scraper takes a gzip body (Prometheus always asks). ``gzip;q=0`` refuses it (RFC 9110 12.5.3);
    ``*`` is not taken to mean gzip, as the Prometheus client libraries do not."""
    for part in accept_encoding.lower().split(","):
        coding, _, params = part.partition(";")
        if coding.strip() == "gzip":
            return _quality(params) > 0
    return False


async def render_async(
    registry: Registry, accept: str = "", lines_per_turn: int = 250, gzip: bool = False
) -> tuple[bytes, str]:
    """As :func:`render`, handing the event loop back every ``lines_per_turn`` lines; with ``gzip``, the body is
    gzip-compressed (``Content-Encoding: gzip``) a turn's text at a time.

    The agent keeps the series of every workload it has seen until they expire, so a node that served many
    short-lived workloads renders tens of thousands of lines: 20,000 series take about 200 ms to render and
    35 ms to compress, which in one piece stalled every relay on the loop. 250 lines are 2-4 ms of rendering and
    compressing (measured turn by turn, median and worst, on this 2-core machine shared with others: at 2000 lines
    a turn they were 10-13 ms, up to 50 ms).
    """
    openmetrics = wants_openmetrics(accept)
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if gzip else None  # 31: a gzip header and trailer
    out: list[bytes] = []
    turn: list[str] = []
    for piece in _Exposition(openmetrics, lines_per_turn).pieces(registry):
        if piece:
            turn.append(piece)
            continue
        out.append(_encoded(turn, compressor))
        await asyncio.sleep(0)
    out.append(_encoded(turn, compressor))
    if compressor is not None:
        out.append(compressor.flush())
    return b"".join(out), OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE


def _encoded(pieces: list[str], compressor: zlib._Compress | None) -> bytes:
    """The pieces as UTF-8, compressed when there is a compressor; empties ``pieces``."""
    data = "".join(pieces).encode()
    pieces.clear()
    return data if compressor is None else compressor.compress(data)


def render_text(registry: Registry) -> str:
    return "".join(_Exposition(False).pieces(registry))


def render_openmetrics(registry: Registry) -> str:
    return "".join(_Exposition(True).pieces(registry))


_TURN = ""
"""Yielded between pieces where a caller may hand the loop back (an empty string: joins to nothing)."""


class _Exposition:
    """One scrape's rendering. Each distinct label set is rendered once per scrape and each distinct value
    escaped once: Istio's four traffic counters share their label sets, and most values repeat (`unknown`,
    `tcp`, a namespace), which made label escaping most of a large scrape's cost."""

    def __init__(self, openmetrics: bool, lines_per_turn: int = 0) -> None:
        self.openmetrics = openmetrics
        self.lines_per_turn = lines_per_turn
        self._escaped: dict[str, str] = {}
        # label names -> (their sorted positions with `name="` prefixes, rendered label sets by values)
        self._layouts: dict[tuple[str, ...], tuple[list[tuple[int, str]], dict[tuple[str, ...], str]]] = {}

    def pieces(self, registry: Registry) -> Iterator[str]:
        every, count = self.lines_per_turn, 0
        for fam in registry.collect():
            if self.openmetrics:
                doc, name = _escape_help(fam.documentation, quote=True), fam.name
            else:  # the 0.0.4 format names a counter's HELP and TYPE lines after its samples, as prometheus_client
                doc, name = _escape_help(fam.documentation), fam.sample_name
            yield f"# HELP {name} {doc}\n# TYPE {name} {fam.type}\n"
            sample = fam.sample_name
            if not fam.labelnames:
                for _, value in fam.rows:
                    yield f"{sample} {_number(value)}\n"
                continue
            layout = self._layouts.get(fam.labelnames)
            if layout is None:
                names = fam.labelnames
                order = [(i, f'{names[i]}="') for i in sorted(range(len(names)), key=names.__getitem__)]
                layout = self._layouts[names] = (order, {})
            order, rendered = layout
            escaped = self._escaped
            for values, value in fam.rows:
                labels = rendered.get(values)
                if labels is None:
                    parts = []
                    for i, prefix in order:
                        v = values[i]
                        e = escaped.get(v)
                        if e is None:
                            e = escaped[v] = _escape_label(v)
                        parts.append(f'{prefix}{e}"')
                    labels = rendered[values] = "{" + ",".join(parts) + "}"
                yield f"{sample}{labels} {_number(value)}\n"
                count += 1
                if every and count % every == 0:
                    yield _TURN
        if self.openmetrics:
            yield "# EOF\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str, quote: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _number(value: float) -> str:
    if isinstance(value, int):
        return f"{int(value)}.0"  # int(): a bool is an int whose str is 'True', which no scraper parses
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
