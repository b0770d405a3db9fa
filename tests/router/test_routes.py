from __future__ import annotations

import enum
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.router.routes import (
    Route,
    RouteTable,
    attach_direction_and_address,
    normalise_address,
    split_segments,
)


def table(*specs: tuple[str, str, str, str]) -> RouteTable:
    routes = []
    for i, (kind, value, connector, direction) in enumerate(specs):
        routes.append(Route(connector=connector, direction=direction, index=i, **{kind: value}))
    return RouteTable(routes)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("devices/d1/messages/events", "devices/d1/messages/events"),
        ("/devices/d1/messages/events", "devices/d1/messages/events"),
        ("amqps://myhub.azure-devices.net/devices/d1/messages/events", "devices/d1/messages/events"),
        ("amqps://myhub.azure-devices.net:5671/devices/d1", "devices/d1"),
        ("AMQP://[::1]:5672/$cbs", "$cbs"),
        ("amqps://host", ""),
        ("$cbs", "$cbs"),
        ("http://x/y", "http://x/y"),
    ],
)
def test_normalise(address: str, expected: str) -> None:
    assert normalise_address(address) == expected


def test_qdr_article_routes() -> None:
    t = table(("prefix", "$cbs", "iothub", "both"), ("prefix", "devices/", "iothub", "both"))
    for addr in ["$cbs", "$cbs/", "/$cbs", "amqps://h/$cbs", "$cbs/x"]:
        for d in ("in", "out"):
            m = t.match(addr, d)
            assert m is not None and m.route.prefix == "$cbs"
    for addr in [
        "devices/d1/messages/events",
        "/devices/d1/messages/devicebound",
        "amqps://myhub.azure-devices.net:5671/devices/d1/twin",
        "devices",
    ]:
        m = t.match(addr, "in")
        assert m is not None and m.route.prefix == "devices/"
    for addr in ["$cbsx", "device", "devicesX/a", "messages/events", "", None, "x/devices/a"]:
        assert t.match(addr, "in") is None


def test_prefix_is_segment_based_not_dot() -> None:
    t = table(("prefix", "devices/a", "c", "both"))
    assert t.match("devices/a/messages", "in") is not None
    assert t.match("devices/a", "in") is not None
    assert t.match("devices/ab", "in") is None
    # Dots are not separators: device ids may contain them.
    assert t.match("devices/a.b", "in") is None


def test_direction() -> None:
    t = table(("prefix", "x", "up", "in"), ("prefix", "x", "down", "out"))
    assert t.match("x/1", "in").route.connector == "up"
    assert t.match("x/1", "out").route.connector == "down"
    t2 = table(("prefix", "x", "up", "in"))
    assert t2.match("x", "out") is None


def test_pattern_wildcards() -> None:
    t = table(("pattern", "devices/*/messages/events", "c", "both"))
    assert t.match("devices/d1/messages/events", "in")
    assert not t.match("devices/d1/x/messages/events", "in")
    assert not t.match("devices/messages/events", "in")
    t = table(("pattern", "a/#/z", "c", "both"))
    for a in ["a/z", "a/b/z", "a/b/c/z"]:
        assert t.match(a, "in"), a
    assert not t.match("a/b", "in")
    t = table(("pattern", "#", "c", "both"))
    assert t.match("", "in") and t.match("x/y", "in")


def test_most_specific_wins() -> None:
    t = table(
        ("pattern", "#", "hash", "both"),
        ("prefix", "devices/", "short", "both"),
        ("pattern", "devices/*/messages/events", "star", "both"),
        ("prefix", "devices/d1", "long", "both"),
        ("pattern", "devices/d1/messages/events", "exact", "both"),
        ("prefix", "devices/d1/messages/events", "prefix-equal", "both"),
    )
    assert t.match("devices/d1/messages/events", "in").route.connector == "exact"
    assert t.match("devices/d1/messages/devicebound", "in").route.connector == "long"
    assert t.match("devices/d2/messages/events", "in").route.connector == "star"
    assert t.match("devices/d2/twin", "in").route.connector == "short"
    assert t.match("other", "in").route.connector == "hash"
    assert t.match("devices/d1/messages/events/x", "in").route.connector == "prefix-equal"


def test_tie_goes_to_first_configured() -> None:
    t = table(("prefix", "a", "first", "both"), ("prefix", "a/", "second", "both"))
    assert t.match("a/b", "in").route.connector == "first"


def test_wildcards_in_a_prefix_are_literal() -> None:
    t = table(("prefix", "a/*", "c", "both"))
    assert t.match("a/*/x", "in")
    assert not t.match("a/b/x", "in")


def test_from_config_dicts_and_objects() -> None:
    class R:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    t = RouteTable.from_config(
        [
            {"prefix": "$cbs", "connector": "iothub", "direction": "both"},
            R(prefix=None, pattern="devices/#", connector="iothub", direction="in"),
        ]
    )
    assert t.as_list() == [
        {"prefix": "$cbs", "connector": "iothub", "direction": "both"},
        {"pattern": "devices/#", "connector": "iothub", "direction": "in"},
    ]
    assert t.match("devices/x", "out") is None


def test_from_config_without_direction_serves_both_ways() -> None:
    """A route with no direction (a dict without the key, or an object without the
    attribute, as a partial config object) serves device senders and receivers alike."""

    class R:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    t = RouteTable.from_config([{"prefix": "$cbs", "connector": "a"}, R(pattern="devices/#", connector="b")])
    assert t.as_list() == [
        {"prefix": "$cbs", "connector": "a", "direction": "both"},
        {"pattern": "devices/#", "connector": "b", "direction": "both"},
    ]
    for direction in ("in", "out"):
        assert t.match("$cbs", direction).route.connector == "a"
        assert t.match("devices/d1", direction).route.connector == "b"
    assert [r.index for r in t.routes] == [0, 1]


def test_from_config_enum_direction() -> None:
    class Dir(enum.Enum):
        IN = "in"

    t = RouteTable.from_config([{"prefix": "devices/", "connector": "c", "direction": Dir.IN}])
    assert t.routes[0].direction == "in"
    assert t.match("devices/d1", "in") is not None and t.match("devices/d1", "out") is None


def test_match_reports_the_normalised_address() -> None:
    t = RouteTable.from_config([{"prefix": "devices/", "connector": "c"}])
    got = t.match("amqps://myhub.azure-devices.net:5671/devices/d1/messages/events", "in")
    assert got is not None and got.address == "devices/d1/messages/events"
    assert got.route is t.routes[0]


def test_exact_pattern_beats_equal_prefix_listed_first() -> None:
    t = table(("prefix", "a/b", "prefix", "both"), ("pattern", "a/b", "pattern", "both"))
    assert t.match("a/b", "in").route.connector == "pattern"
    assert t.match("a/b/c", "in").route.connector == "prefix"


def test_tie_without_indexes_goes_to_first_listed() -> None:
    t = RouteTable([Route(connector="first", prefix="a"), Route(connector="second", prefix="a")])
    assert t.match("a/b", "in").route.connector == "first"


def test_prefix_ending_in_wildcard_or_letter_characters() -> None:
    """Only trailing slashes are dropped from a prefix; other characters are the id's."""
    t = table(("prefix", "devices/devX", "x", "both"))
    assert t.match("devices/devX/messages", "in")
    assert not t.match("devices/dev/messages", "in")
    assert not t.match("devices/devXX", "in")
    assert table(("prefix", "devices/d1//", "x", "both")).match("devices/d1", "in")


def test_route_validation() -> None:
    one_of = "^a route needs exactly one of prefix or pattern$"
    with pytest.raises(ValueError, match=one_of):
        Route(connector="c")
    with pytest.raises(ValueError, match=one_of):
        Route(connector="c", prefix="a", pattern="b")
    with pytest.raises(ValueError, match="^bad route direction 'sideways'$"):
        Route(connector="c", prefix="a", direction="sideways")  # type: ignore[arg-type]


def test_attach_direction_and_address() -> None:
    class T:
        def __init__(self, address):
            self.address = address

    assert attach_direction_and_address(False, T("s"), T("t")) == ("in", "t")
    assert attach_direction_and_address(True, T("s"), T("t")) == ("out", "s")
    assert attach_direction_and_address(True, None, T("t")) == ("out", None)
    assert attach_direction_and_address(False, T("s"), None) == ("in", None)
    # A terminus object without an address attribute at all reads as no address.
    assert attach_direction_and_address(True, object(), None) == ("out", None)
    assert attach_direction_and_address(False, None, object()) == ("in", None)


# ---- properties -------------------------------------------------------------

segment = st.text(alphabet="abc$.-_%", min_size=1, max_size=3)
segments = st.lists(segment, min_size=0, max_size=5)
token = st.one_of(segment, st.just("*"), st.just("#"))
patterns = st.lists(token, min_size=0, max_size=5)


def reference_match(pattern: list[str], address: list[str]) -> bool:
    """Independent matcher: translate to a regex over '/'-joined segments."""
    parts = []
    for t in pattern:
        if t == "#":
            parts.append(r"(?:[^/]+/)*")
        elif t == "*":
            parts.append(r"[^/]+/")
        else:
            parts.append(re.escape(t) + "/")
    rx = "".join(parts)
    return re.fullmatch(rx, "".join(s + "/" for s in address)) is not None


@given(patterns, segments)
def test_pattern_matches_like_reference(pattern: list[str], address: list[str]) -> None:
    t = RouteTable([Route(connector="c", pattern="/".join(pattern))])
    got = t.match("/".join(address), "in") is not None
    assert got == reference_match(pattern, address)


@given(segments, segments)
def test_prefix_equals_pattern_hash(prefix: list[str], address: list[str]) -> None:
    p = RouteTable([Route(connector="c", prefix="/".join(prefix))])
    q = RouteTable([Route(connector="c", pattern="/".join(prefix + ["#"]))])
    addr = "/".join(address)
    assert (p.match(addr, "in") is None) == (q.match(addr, "in") is None)
    expected = address[: len(prefix)] == prefix
    assert (p.match(addr, "in") is not None) == expected


@given(segments, st.sampled_from(["", "/", "amqp://h/", "amqps://h.x:5671/", "AMQPS://[::1]:1/"]))
def test_normalisation_forms_match_alike(address: list[str], lead: str) -> None:
    addr = "/".join(address)
    assert normalise_address(lead + addr) == addr
    assert split_segments(normalise_address(lead + addr)) == tuple(address)


@given(segments, st.lists(patterns, min_size=1, max_size=6))
def test_exact_route_always_wins(address: list[str], others: list[list[str]]) -> None:
    routes = [Route(connector=f"r{i}", pattern="/".join(p), index=i) for i, p in enumerate(others)]
    exact = Route(connector="exact", pattern="/".join(address), index=len(routes))
    m = RouteTable(routes + [exact]).match("/".join(address), "out")
    assert m is not None
    # Another route may only win if it is the same exact pattern listed earlier.
    assert m.route.connector == "exact" or m.route.pattern == exact.pattern


@given(segments, st.lists(patterns, min_size=1, max_size=6))
def test_winner_order_independent_of_listing(address: list[str], pats: list[list[str]]) -> None:
    # Distinct patterns: the winner must not depend on configuration order.
    uniq = list(dict.fromkeys("/".join(p) for p in pats))
    fwd = RouteTable([Route(connector=p, pattern=p, index=i) for i, p in enumerate(uniq)])
    rev = RouteTable([Route(connector=p, pattern=p, index=i) for i, p in enumerate(reversed(uniq))])
    a, b = fwd.match("/".join(address), "in"), rev.match("/".join(address), "in")
    assert (a is None) == (b is None)
    if a is not None:
        assert a.route.score(split_segments("/".join(address))) == b.route.score(
            split_segments("/".join(address))
        )
