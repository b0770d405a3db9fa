"""Topic names, topic filters and the per-route topic policy.

Matching follows MQTT semantics (3.1.1 section 4.7): `+` is one level, `#` is
the rest (including the parent level), and a filter starting with a wildcard
does not match a topic starting with `$` (so `#` does not match `$iothub/...`).
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import MalformedPacket


def validate_topic_name(topic: str, *, allow_empty: bool = False) -> None:
    """A PUBLISH/Will topic: non-empty (unless a v5 topic alias stands in) and wildcard-free."""
    if not topic and not allow_empty:
        raise MalformedPacket("empty topic name")
    if "+" in topic or "#" in topic:
        raise MalformedPacket("wildcard in topic name")


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid filter, or None when it is."""
    if not topic_filter:
        return "empty topic filter"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole, last level of a topic filter"
        if "+" in level and level != "+":
            return "'+' must be a whole level of a topic filter"
    return None


def validate_topic_filter(topic_filter: str) -> None:
    problem = topic_filter_problem(topic_filter)
    if problem:
        raise MalformedPacket(problem)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` (a topic name) matches `topic_filter`."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """True when every topic `topic_filter` can match is also matched by `pattern`."""
    if topic_filter.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    p_levels = pattern.split("/")
    f_levels = topic_filter.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(f_levels):
            return False
        f = f_levels[i]
        if f == "#":
            return False  # the filter reaches further than this pattern
        if p == "+":
            continue
        if f == "+" or f != p:
            return False
    return len(p_levels) == len(f_levels)


class TopicPolicy:
    """Which topics a route lets a device publish to and subscribe to.

    A PUBLISH is allowed when its topic matches a pattern; a SUBSCRIBE filter
    when a pattern covers everything the filter could match.
    """

    __slots__ = ("patterns",)

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        for p in self.patterns:
            problem = topic_filter_problem(p)
            if problem:
                raise ValueError(f"allowed topic pattern {p!r}: {problem}")

    def allows_publish(self, topic: str) -> bool:
        return any(topic_matches(p, topic) for p in self.patterns)

    def allows_subscribe(self, topic_filter: str) -> bool:
        return any(filter_covers(p, topic_filter) for p in self.patterns)
