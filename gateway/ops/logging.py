"""Logging setup (stdlib ``logging``): text or JSON lines, with secrets redacted.

Every record passes a filter that masks SAS tokens and ``sig=`` values, in
the message, its arguments and ``extra`` fields, and the formatters redact
their final output again (exception texts included), so a token that reaches
a log call never reaches the log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

__all__ = ["RedactingFilter", "redact", "setup_logging"]

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
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{key}={value}" for key, value in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
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
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
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
    handler.addFilter(RedactingFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
