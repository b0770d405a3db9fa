"""Device-supplied text in log lines and error descriptions, bounded.

Anything a device sends (client ids, user names, addresses, link names,
topics, SASL mechanism names, host names) reaches a log line only through
`shown`: at most `MAX_SHOWN` characters of it, and its full length when cut,

    shown("abc" * 30000)  ->  'abcabc…'(90000 chars)

so a device cannot make a line longer than the gateway's own text plus a few
hundred characters. Pure functions, no logging import: the protocol layer
(error descriptions) uses it as well as the relays and operations.

Cost: one length check for the usual short value; call it where the line is
built, never on a per-message path whose line is not logged.
"""

from __future__ import annotations

__all__ = ["MAX_SHOWN", "shown", "shown_plain", "source"]

#: Characters of a device-supplied value a log line shows.
MAX_SHOWN = 128


def _head(value: object, limit: int) -> tuple[str, int, str]:
    """(the first `limit` characters as text, the full length, its unit)."""
    if isinstance(value, str):
        return value[:limit], len(value), "chars"
    if isinstance(value, bytes | bytearray | memoryview):
        # Only the head is decoded: a huge value is never copied whole.
        return bytes(value[:limit]).decode("utf-8", "replace"), len(value), "bytes"
    text = str(value)
    return text[:limit], len(text), "chars"


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr`` of a device-supplied value, cut to `limit` characters with its length.

    ``'abc…'(65535 chars)`` when cut; bytes count in bytes, text in characters.
    """
    head, size, unit = _head(value, limit)
    quoted = repr(head)
    if size <= limit:
        return quoted
    return f"{quoted[:-1]}…{quoted[-1]}({size} {unit})"


def shown_plain(value: object, limit: int = MAX_SHOWN) -> str:
    """As `shown`, without quotes: for addresses and host names, ``host…(300 chars)``."""
    head, size, unit = _head(value, limit)
    if not head.isprintable():
        head = repr(head)[1:-1]
    return head if size <= limit else f"{head}…({size} {unit})"


def source(host: object, kind: str = "") -> dict[str, str]:
    """``extra=`` for a log call about something a device at `host` did: the
    logging setup (`gateway.ops.logging.RepeatLimiter`) rate-limits repeated
    lines per source and `kind` (what went wrong, when one message template
    serves several). Neither is printed."""
    return {"_source": shown_plain(host, 64), "_kind": kind}
