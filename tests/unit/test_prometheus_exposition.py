"""agent.prometheus renders what Prometheus parses: both formats read back with prometheus_client's own parsers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from agent.prometheus import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    Counter,
    Gauge,
    MetricFamily,
    Registry,
    counter_family,
    gauge_family,
    render,
)

AWKWARD = 'a "quoted" back\\slash\nand newline'


class _Collector:
    def collect(self) -> list[MetricFamily]:
        fam = counter_family("scraped_things_total", "Things seen at scrape time", labels=["kind"])
        fam.add_metric(["x"], 3)
        fam.add_metric([AWKWARD], 2.5)
        return [fam, gauge_family("open_now", "A gauge without labels", value=7)]


def _registry() -> Registry:
    r = Registry()
    c = Counter("events", "Events by reason,\nwith a \\ and a newline in the help", ["reason"], registry=r)
    c.labels("a").inc()
    c.labels("a").inc(2)
    c.labels("b").inc()
    g = Gauge("expiry_seconds", "A labelled gauge", ["identity"], registry=r)
    g.labels("spiffe://td/ns/x/sa/y").set(1.5e9)
    g.labels("gone").set(1)
    g.remove("gone")
    Counter("plain_total", "A counter without labels", registry=r).inc(4)
    r.register(_Collector())
    return r


def _values(families: Iterable[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


EXPECTED = {
    ("events_total", (("reason", "a"),)): 3.0,
    ("events_total", (("reason", "b"),)): 1.0,
    ("expiry_seconds", (("identity", "spiffe://td/ns/x/sa/y"),)): 1.5e9,
    ("plain_total", ()): 4.0,
    ("scraped_things_total", (("kind", "x"),)): 3.0,
    ("scraped_things_total", (("kind", AWKWARD),)): 2.5,
    ("open_now", ()): 7.0,
}


def test_text_format_parses_back_to_every_sample() -> None:
    body, ctype = render(_registry(), "text/plain")
    assert ctype == TEXT_CONTENT_TYPE
    families = list(parse_text(body.decode()))
    assert _values(families) == EXPECTED
    types = {f.name: f.type for f in families}
    assert types == {
        "events": "counter",
        "expiry_seconds": "gauge",
        "plain": "counter",
        "scraped_things": "counter",
        "open_now": "gauge",
    }
    docs = {f.name: f.documentation for f in families}
    assert docs["events"] == "Events by reason,\nwith a \\ and a newline in the help"


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
    body, ctype = render(_registry(), accept)
    assert ctype == OPENMETRICS_CONTENT_TYPE
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = list(parse_openmetrics(text))  # the strict parser: refuses a body without # EOF or with bad types
    assert _values(families) == EXPECTED


@pytest.mark.parametrize("accept", ["", "*/*", "text/plain;version=0.0.4", "application/json"])
def test_anything_else_gets_the_text_format(accept: str) -> None:
    assert render(_registry(), accept)[1] == TEXT_CONTENT_TYPE


def test_counters_only_go_up_and_label_counts_are_checked() -> None:
    r = Registry()
    c = Counter("c", "doc", ["a", "b"], registry=r)
    with pytest.raises(ValueError):
        c.labels("only-one")
    with pytest.raises(ValueError):
        c.labels("x", "y").inc(-1)
    with pytest.raises(ValueError):
        Counter("c_total", "same family name", registry=r)
    fam = counter_family("f", "doc", labels=["a"])
    with pytest.raises(ValueError):
        fam.add_metric(["1", "2"], 1)


def test_special_values() -> None:
    r = Registry()
    g = Gauge("g", "doc", ["v"], registry=r)
    g.labels("inf").set(math.inf)
    g.labels("ninf").set(-math.inf)
    g.labels("nan").set(math.nan)
    g.labels("small").set(0.125)
    values = _values(parse_text(render(r)[0].decode()))
    assert values[("g", (("v", "inf"),))] == math.inf
    assert values[("g", (("v", "ninf"),))] == -math.inf
    assert math.isnan(values[("g", (("v", "nan"),))])
    assert values[("g", (("v", "small"),))] == 0.125


def test_get_sample_value_matches_exact_labels() -> None:
    r = _registry()
    assert r.get_sample_value("events_total", {"reason": "a"}) == 3
    assert r.get_sample_value("events_total", {"reason": "zzz"}) is None
    assert r.get_sample_value("plain_total") == 4
    assert r.get_sample_value("expiry_seconds", {"identity": "gone"}) is None


def test_a_flag_given_as_a_value_renders_as_a_number() -> None:
    """A collector yielding a bool (a flag: attached, ready) rendered 'True.0', which Prometheus refuses, failing
    the whole scrape; prometheus_client renders it 1.0."""
    r = Registry()

    class _Flags:
        def collect(self) -> list[MetricFamily]:
            return [gauge_family("up_flag", "doc", value=True), gauge_family("down_flag", "doc", value=False)]

    r.register(_Flags())
    for body, parse in ((render(r)[0], parse_text), (render(r, "application/openmetrics-text")[0], parse_openmetrics)):
        values = _values(parse(body.decode()))
        assert values[("up_flag", ())] == 1.0 and values[("down_flag", ())] == 0.0
