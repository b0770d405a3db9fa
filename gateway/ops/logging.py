"""Logging setup (stdlib ``logging``): text or JSON lines, with secrets redacted.

Every record passes a filter that masks SAS tokens and ``sig=`` values, in
the message, its arguments and ``extra`` fields, and the formatters redact
their final output again (exception texts included), so a token that reaches
a log call never reaches the log.

Flooding: device-supplied values are cut where lines are built
(`gateway.logsafe.shown`); as a last bound the formatters cut any message
longer than `MAX_MESSAGE` characters. `RepeatLimiter` logs the first of a run
of repeated warnings (same logger, same message template, same source) per
window and counts the rest, then says how many it suppressed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "MAX_MESSAGE",
    "RedactingFilter",
    "RepeatLimiter",
    "flush_suppressed",
    "redact",
    "setup_logging",
]

_SAS_TOKEN = re.compile(r"SharedAccessSignature\s+((?:<redacted>|[^\s\"'<>,;])+)")
_SIG_VALUE = re.compile(r"(?<![A-Za-z0-9_])sig=(?!<redacted>)[^&\s\"'<>,;]*")
REDACTED = "<redacted>"

# LogRecord attributes that are not user "extra" fields.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


def _mask_token(match: re.Match[str]) -> str:
    fields: dict[str, str] = {}
    for part in match.group(1).split("&"):
        name, _, value = part.partition("=")
        fields.setdefault(name, value)
    text = (
        f"SharedAccessSignature sr={fields.get('sr', '')}&sig={REDACTED}&se={fields.get('se', '')}"
    )
    if "skn" in fields:
        text += f"&skn={fields['skn']}"
    return text


def redact(text: str) -> str:
    """Mask SAS tokens and ``sig=`` values in ``text``.

    ``SharedAccessSignature sr=X&sig=Y&se=Z`` becomes
    ``SharedAccessSignature sr=X&sig=<redacted>&se=Z``.
    """
    if "SharedAccessSignature" not in text and "sig=" not in text:
        return text  # the common case costs one scan
    text = _SAS_TOKEN.sub(_mask_token, text)
    return _SIG_VALUE.sub(f"sig={REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    return redact(str(value))


class RedactingFilter(logging.Filter):
    """Applies ``redact`` to a record's message, arguments and extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: log it as given, still redacted
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                setattr(record, key, _redact_value(value))
        record._redacted = True
        return True


# A message longer than this is cut by the formatters (device values are cut
# before, at 128 characters each: this only catches a value that slipped through).
MAX_MESSAGE = 3000
# Traceback lines are cut at this length (an exception text may quote a device value).
_MAX_TRACE_LINE = 1000

# Repeated warnings: the window, and how many keys are tracked at most.
REPEAT_WINDOW = 10.0
_MAX_KEYS = 4096


@dataclass(slots=True)
class _Run:
    """A run of repeated records of one key within one window."""

    until: float  # the window's end
    suppressed: int
    level: int
    name: str
    sample: str  # the first suppressed record's message


Key = tuple[str, int, Any, str, str]


class RepeatLimiter(logging.Filter):
    """Per (logger, level, message template, source, kind): the first record of each window
    `window` seconds long passes, the rest of that window are counted, and once
    the window is over one line says ``N more like this suppressed`` with the
    first suppressed message.

    Applies to WARNING and above. A record about a device names its source with
    ``extra=gateway.logsafe.source(host, kind)``. The source is that host, else the
    first argument of the message (a listener, connector or device name); the kind
    tells apart lines of one template (e.g. an MQTT close reason). The count is emitted
    when the next record of the key arrives after the window, when any record
    arrives after some window ended, and on `flush` (the daemon calls it every
    window, and `setup_logging` before replacing a handler), so it is never lost.
    `clock` is for tests.
    """

    def __init__(self, handler: logging.Handler, window: float = REPEAT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        super().__init__()
        self.handler = handler
        self.window = window
        self.clock = clock
        self._runs: dict[Key, _Run] = {}
        self._next_end = float("inf")  # the earliest window end with a count to report

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_repeat_summary", False):
            return True
        if record.levelno < logging.WARNING:
            return True
        src = getattr(record, "_source", None)
        now = self.clock()
        if now >= self._next_end:
            self.flush(now)
        if src is None:
            args = record.args
            first = args[0] if isinstance(args, tuple) and args else ""
            src = str(first)[:64]
        kind = str(getattr(record, "_kind", ""))
        key: Key = (record.name, record.levelno, record.msg, src, kind)
        run = self._runs.get(key)
        if run is None or now >= run.until:
            if run is not None and run.suppressed:
                self._report(key, run)
            if len(self._runs) >= _MAX_KEYS:
                self.flush(now)
                if len(self._runs) >= _MAX_KEYS:
                    key = (record.name, record.levelno, record.msg, "*", "")  # the overflow
                    run = self._runs.get(key)
                    if run is not None and now < run.until:
                        return self._suppress(run, record)
            self._runs[key] = _Run(now + self.window, 0, record.levelno, record.name, "")
            return True
        return self._suppress(run, record)

    def _suppress(self, run: _Run, record: logging.LogRecord) -> bool:
        if not run.suppressed:
            try:
                run.sample = record.getMessage()[:MAX_MESSAGE]
            except Exception:  # a bad format string: the template will do
                run.sample = str(record.msg)[:MAX_MESSAGE]
            self._next_end = min(self._next_end, run.until)
        run.suppressed += 1
        return False

    def flush(self, now: float | None = None) -> None:
        """Report every run whose window is over (all of them when `now` is None)."""
        if now is None:
            now = float("inf")
        self._next_end = float("inf")
        for key, run in list(self._runs.items()):
            if now >= run.until:
                if run.suppressed:
                    self._report(key, run)
                del self._runs[key]
            elif run.suppressed:
                self._next_end = min(self._next_end, run.until)

    def _report(self, key: Key, run: _Run) -> None:
        count, run.suppressed = run.suppressed, 0
        where = f" from {key[3]}" if key[3] and key[3] != "*" else ""
        record = logging.LogRecord(
            run.name, run.level, __file__, 0,
            "%d more like this%s suppressed in %gs, the first: %s",
            (count, where, self.window, run.sample), None,
        )  # fmt: skip
        record._repeat_summary = True
        self.handler.handle(record)


def _bounded(text: str) -> str:
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[:MAX_MESSAGE]}…({len(text)} chars)"


def _bounded_trace(text: str) -> str:
    if len(text) <= _MAX_TRACE_LINE:
        return text
    return "\n".join(_bounded_line(line) for line in text.split("\n"))


def _bounded_line(line: str) -> str:
    if len(line) <= _MAX_TRACE_LINE:
        return line
    return f"{line[:_MAX_TRACE_LINE]}…({len(line)} chars)"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO gateway.net: message key=value``"""

    def format(self, record: logging.LogRecord) -> str:
        message = _bounded(record.getMessage())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        if record.exc_info:
            line += "\n" + _bounded_trace(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _bounded(record.getMessage()),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = _bounded_trace(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


_HANDLER_MARK = "_iot_gateway_handler"


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger: one handler on ``stream`` (default stderr).

    Calling it again (e.g. on reload) replaces the handler it installed before.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # On the handler, not a logger: handler filters see records from every logger.
    # The limiter first: it keys on the message template, which redaction replaces.
    handler.addFilter(RepeatLimiter(handler))
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        _flush_handler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)


def _flush_handler(handler: logging.Handler, final: bool = True) -> None:
    for f in handler.filters:
        if isinstance(f, RepeatLimiter):
            f.flush(None if final else f.clock())


def flush_suppressed(final: bool = False) -> None:
    """Report the counts of repeated warnings whose window is over (`final`: all of
    them, e.g. at exit). The daemon calls it every `REPEAT_WINDOW` seconds."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, _HANDLER_MARK, False):
            _flush_handler(handler, final)
