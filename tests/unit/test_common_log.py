"""common.log: JSON lines, batching per event-loop iteration, and the direct path the access log takes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from agent.accesslog import AccessLog
from agent.metrics import Metrics
from common import log as jsonlog


class CountingStream(io.StringIO):
    """Counts write calls: batching is about how many writes reach the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


@contextlib.contextmanager
def json_handler_only() -> Iterator[None]:
    """Take pytest's capture handlers off the root logger for a moment (they are added around each test body, after
    fixtures ran): the agent in production has only the JSON handler, which is when the direct path applies."""
    root = logging.getLogger()
    others = [h for h in root.handlers if not isinstance(h, jsonlog.JsonHandler)]
    for h in others:
        root.removeHandler(h)
    try:
        yield
    finally:
        for h in others:
            root.addHandler(h)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    for h in saved[0]:
        root.removeHandler(h)
    out = CountingStream()
    jsonlog.setup("info", out)
    try:
        yield out
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_a_line_outside_a_loop_is_written_at_once(stream: CountingStream) -> None:
    logging.getLogger("ambit.test").info("hello", extra=jsonlog.kv(a=1, ident="spiffe://x"))
    [line] = stream.lines()
    assert line["level"] == "info" and line["scope"] == "ambit.test" and line["msg"] == "hello"
    assert line["a"] == 1 and line["ident"] == "spiffe://x"
    assert isinstance(line["time"], str) and line["time"].endswith("Z") and len(line["time"]) == 24


def test_exceptions_are_a_field(stream: CountingStream) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("ambit.test").exception("failed")
    [line] = stream.lines()
    assert line["level"] == "error" and "ValueError: boom" in str(line["error"])


async def test_lines_on_the_loop_are_written_once_per_iteration_in_order(stream: CountingStream) -> None:
    log = logging.getLogger("ambit.test")
    for i in range(5):
        log.info("line", extra=jsonlog.kv(i=i))
    assert stream.getvalue() == ""  # still pending: the iteration's callbacks are not done
    await asyncio.sleep(0)
    assert [line["i"] for line in stream.lines()] == [0, 1, 2, 3, 4]
    assert stream.writes == 1


async def test_a_line_from_another_thread_comes_after_the_pending_batch(stream: CountingStream) -> None:
    log = logging.getLogger("ambit.test")
    log.info("first")
    worker = threading.Thread(target=log.info, args=("from a thread",))
    worker.start()
    worker.join()
    await asyncio.sleep(0)
    assert [line["msg"] for line in stream.lines()] == ["first", "from a thread"]


async def test_flush_writes_what_is_pending(stream: CountingStream) -> None:
    logging.getLogger("ambit.test").warning("about to stop")
    logging.shutdown()  # what the process does on exit, possibly before the loop iterates again
    assert [line["msg"] for line in stream.lines()] == ["about to stop"]


def test_direct_handler_only_when_the_json_handler_is_the_only_destination(stream: CountingStream) -> None:
    with json_handler_only():
        _direct_handler_cases()


def _direct_handler_cases() -> None:
    logger = logging.getLogger("access.test-direct")
    [handler] = logging.getLogger().handlers
    assert jsonlog.direct_handler(logger, logging.INFO) is handler
    assert jsonlog.direct_handler(logger, logging.DEBUG) is None  # below the root level
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)  # e.g. pytest's caplog
    try:
        assert jsonlog.direct_handler(logger, logging.INFO) is None
    finally:
        logging.getLogger().removeHandler(other)
    logger.addFilter(lambda record: True)
    try:
        assert jsonlog.direct_handler(logger, logging.INFO) is None
    finally:
        logger.filters.clear()


def test_access_log_lines_are_the_same_on_both_paths(stream: CountingStream) -> None:
    """The direct path and the record path must write identical fields (only the time and the measured duration
    may differ: on a loaded machine a record can take a millisecond)."""

    def one() -> dict[str, object]:
        r = AccessLog(Metrics(), logging.getLogger("access.test-same")).start(
            "outbound", ("10.1.0.5", 40000), ("10.2.0.7", 8080)
        )
        r.finish(10, 20, error="connect 10.2.0.7:8080: refused", flags="CONNECT")
        line = stream.lines()[-1]
        line.pop("time")
        assert str(line.pop("duration")).endswith("ms")
        return line

    with json_handler_only():
        assert jsonlog.direct_handler(logging.getLogger("access.test-same"), logging.ERROR) is not None
        direct = one()
    assert jsonlog.direct_handler(logging.getLogger("access.test-same"), logging.ERROR) is None  # pytest's too
    via_record = one()
    assert direct == via_record
    assert direct["level"] == "error" and direct["msg"] == "connection complete" and direct["bytes_recv"] == 20


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("info", {"": logging.INFO}),
        ("WARN", {"": logging.WARNING}),
        ("info,access=warning", {"": logging.INFO, "access": logging.WARNING}),
        (" debug , agent.outbound = error ,", {"": logging.DEBUG, "agent.outbound": logging.ERROR}),
        ("access=off", {"access": logging.CRITICAL + 10}),
    ],
)
def test_level_settings_as_rust_log_shapes_them(spec: str, expected: dict[str, int]) -> None:
    assert jsonlog.parse_levels(spec) == expected


@pytest.mark.parametrize(("spec", "what"), [("verbose", "'verbose' is not one of"), ("=info", "no logger name")])
def test_a_bad_level_setting_says_which_item(spec: str, what: str) -> None:
    with pytest.raises(jsonlog.LogLevelError, match=what):
        jsonlog.parse_levels(spec)


def test_setup_sets_per_logger_levels_and_the_access_log_obeys(stream: CountingStream) -> None:
    access = logging.getLogger("access")
    saved = access.level
    try:
        jsonlog.setup("info,access=warning", stream)
        assert logging.getLogger().level == logging.INFO and access.level == logging.WARNING
        AccessLog(Metrics()).start("inbound", ("10.1.0.5", 1), ("10.2.0.7", 80)).finish(1, 1)  # clean: info, quieted
        AccessLog(Metrics()).start("inbound", ("10.1.0.5", 2), ("10.2.0.7", 80)).finish(error="connect: refused")
        logging.getLogger("agent").info("still at info")
        assert [(line["level"], line["msg"]) for line in stream.lines()] == [
            ("error", "connection complete"),
            ("info", "still at info"),
        ]
    finally:
        access.setLevel(saved)


def test_agent_and_controller_refuse_a_bad_level_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.main import AgentConfig
    from common import flags
    from controller.main import ControllerConfig

    for cls in (AgentConfig, ControllerConfig):
        with pytest.raises(SystemExit) as exc:
            flags.parse(cls, ["--log-level", "info,access=loud"])
        assert exc.value.code == 2
        assert "log level 'access=loud': 'loud' is not one of" in capsys.readouterr().err
