"""Log flooding: device-supplied text is cut, repeated warnings are rate-limited.

`gateway.logsafe.shown` cuts a device's value to 128 characters and says how
long it was; the handler `setup_logging` installs rate-limits repeated warnings
of one kind from one source (`RepeatLimiter`, tested on a mock clock) and always
reports how many it suppressed.
"""

from __future__ import annotations

import io
import logging

from gateway.logsafe import MAX_SHOWN, shown, shown_plain, source
from gateway.ops.logging import MAX_MESSAGE, RepeatLimiter, flush_suppressed, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def limited(window: float = 10.0) -> tuple[logging.Logger, ListHandler, Clock, RepeatLimiter]:
    clock = Clock()
    handler = ListHandler()
    limiter = RepeatLimiter(handler, window=window, clock=clock)
    handler.addFilter(limiter)
    logger = logging.getLogger(f"test.flood.{id(handler)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    return logger, handler, clock, limiter


# -- cutting --------------------------------------------------------------------------------


def test_shown_cuts_with_the_length() -> None:
    value = "abc" * 21845  # 65,535 characters
    text = shown(value)
    assert text.startswith("'abcabc") and text.endswith("…'(65535 chars)")
    assert len(text) <= MAX_SHOWN + 30
    assert shown("dev1") == "'dev1'"
    assert shown(b"\x00" * 1000).endswith("(1000 bytes)")
    assert len(shown("\x00" * 100000)) < 4 * MAX_SHOWN + 30  # escapes stay bounded
    assert shown_plain("h" * 300) == "h" * MAX_SHOWN + "…(300 chars)"
    assert shown_plain("10.0.0.1") == "10.0.0.1"
    assert source("h" * 300)["_source"].endswith("(300 chars)")


def test_formatter_bounds_any_message(restore_root_logger: None) -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    logging.getLogger("gateway.test").info("value %s", "x" * 100000)
    (line,) = out.getvalue().splitlines()
    assert len(line) < MAX_MESSAGE + 200 and line.endswith("chars)")


# -- rate limiting ----------------------------------------------------------------------------


def test_identical_warnings_give_one_line_and_a_suppressed_count() -> None:
    log, handler, clock, limiter = limited()
    for _ in range(50):
        log.warning("listener %s: %s did not complete the handshake", "amqp", "10.0.0.9",
                    extra=source("10.0.0.9"))  # fmt: skip
    assert handler.lines == ["listener amqp: 10.0.0.9 did not complete the handshake"]
    clock.now += 10.0
    limiter.flush(clock())
    assert len(handler.lines) == 2
    assert handler.lines[1].startswith("49 more like this from 10.0.0.9 suppressed in 10s")
    limiter.flush(clock())
    assert len(handler.lines) == 2  # reported once


def test_suppressed_count_comes_with_the_next_line_after_the_window() -> None:
    log, handler, clock, _ = limited()
    for _ in range(3):
        log.warning("bad frame from %s", "10.0.0.9", extra=source("10.0.0.9"))
    clock.now += 11.0
    log.warning("bad frame from %s", "10.0.0.9", extra=source("10.0.0.9"))
    assert handler.lines == [
        "bad frame from 10.0.0.9",
        "2 more like this from 10.0.0.9 suppressed in 10s, the first: bad frame from 10.0.0.9",
        "bad frame from 10.0.0.9",
    ]


def test_other_sources_kinds_and_levels_are_not_suppressed() -> None:
    log, handler, _, _ = limited()
    log.warning("closed: %s", "a", extra=source("10.0.0.1", "timeout"))
    log.warning("closed: %s", "a", extra=source("10.0.0.2", "timeout"))
    log.warning("closed: %s", "b", extra=source("10.0.0.1", "protocol_error"))
    log.error("closed: %s", "a", extra=source("10.0.0.1", "timeout"))
    for _ in range(5):
        log.info("routine %s", "x", extra=source("10.0.0.1"))
    assert len(handler.lines) == 4 + 5


def test_setup_logging_reports_suppressed_lines_at_the_end(restore_root_logger: None) -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    log = logging.getLogger("gateway.test")
    for _ in range(20):
        log.warning("refused %s", "10.0.0.9", extra=source("10.0.0.9"))
    flush_suppressed(final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "19 more like this from 10.0.0.9 suppressed" in lines[1]
